"""The locomotion command schema shared by the decoding grammar and the parser.

A model answers with one JSON object such as
``{"action": "move", "vx": 0.5, "vy": 0.0, "vyaw": 0.3, "duration": 2.0}``.
The same schema drives the grammar that constrains decoding (so a constrained run
cannot produce anything else) and :func:`parse_command`, which never guesses: text
that is not exactly one schema-valid object is refused with a reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from enum import StrEnum


class Action(StrEnum):
    MOVE = "move"
    STOP = "stop"
    STAND_UP = "stand_up"
    STAND_DOWN = "stand_down"
    SIT = "sit"
    DONE = "done"


@dataclass(frozen=True)
class Limits:
    """Hard bounds of a command, and the one place the command limits are written.

    The grammar (``commands/grammar.py``), :func:`json_schema` and :func:`parse_command` take their
    ranges from here; the motion node's default clamps are these bounds and its limit parameters
    may only tighten them (``go2/motion_rules.py``), so the robot never runs faster than a verified
    command can say.
    """

    max_vx: float = 1.0  # m/s forward
    min_vx: float = -0.5  # m/s backward
    max_vy: float = 0.5  # m/s lateral
    max_vyaw: float = 1.5  # rad/s
    max_duration: float = 5.0  # s


DEFAULT_LIMITS = Limits()


class CommandError(ValueError):
    """Model text that is not a valid command; the reason says what is wrong."""


@dataclass(frozen=True)
class LocomotionCommand:
    action: Action
    vx: float = 0.0
    vy: float = 0.0
    vyaw: float = 0.0
    duration: float = 0.0

    def to_text(self) -> str:
        """The canonical JSON text of this command (parses back to an equal command)."""
        d = asdict(self)
        d["action"] = self.action.value
        return json.dumps(d, separators=(", ", ": "))


FIELDS = ("action", "vx", "vy", "vyaw", "duration")


def json_schema(limits: Limits = DEFAULT_LIMITS) -> dict:
    """JSON schema of one command; key order is fixed so drafts and target agree."""
    return {
        "type": "object",
        "properties": {
            "action": {"type": "string", "enum": [a.value for a in Action]},
            "vx": {"type": "number", "minimum": limits.min_vx, "maximum": limits.max_vx},
            "vy": {"type": "number", "minimum": -limits.max_vy, "maximum": limits.max_vy},
            "vyaw": {"type": "number", "minimum": -limits.max_vyaw, "maximum": limits.max_vyaw},
            "duration": {"type": "number", "minimum": 0, "maximum": limits.max_duration},
        },
        "required": list(FIELDS),
        "additionalProperties": False,
    }


def _number(obj: dict, key: str, lo: float, hi: float) -> float:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandError(f"field {key!r} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # a JSON integer too large for a float
        raise CommandError(f"field {key!r} is too large") from None
    if not math.isfinite(value):
        raise CommandError(f"field {key!r} must be finite, got {value!r}")
    if not lo <= value <= hi:
        raise CommandError(f"field {key!r}={value} is outside [{lo}, {hi}]")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # A repeated key has two values; picking one would be guessing.
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate keys {dup}")
    return dict(pairs)


def parse_command(text: str, limits: Limits = DEFAULT_LIMITS) -> LocomotionCommand:
    """Parse model text into a command, or raise :class:`CommandError` with the reason."""
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge integers, duplicates
        raise CommandError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CommandError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        raise CommandError(f"missing fields {missing}")
    extra = sorted(set(obj) - set(FIELDS))
    if extra:
        raise CommandError(f"unknown fields {extra}")
    try:
        action = Action(obj["action"])
    except (ValueError, TypeError):
        raise CommandError(
            f"unknown action {obj['action']!r}; expected one of {[a.value for a in Action]}"
        ) from None
    return LocomotionCommand(
        action=action,
        vx=_number(obj, "vx", limits.min_vx, limits.max_vx),
        vy=_number(obj, "vy", -limits.max_vy, limits.max_vy),
        vyaw=_number(obj, "vyaw", -limits.max_vyaw, limits.max_vyaw),
        duration=_number(obj, "duration", 0.0, limits.max_duration),
    )
