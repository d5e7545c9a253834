"""What the motion node does with a command, as plain rules: its clamps and the sport requests of each action.

The motion node (``nodes/motion.py``, through ``go2/move_stream.py``) applies these to every command
before anything reaches the robot; the closed-loop evaluation (``speculative_vlm.evaluation``) applies
the same rules in-process to the simulated Go2's dynamics, so an episode there executes exactly what
the robot would.

The limits are defined once, as the command schema's bounds (``commands/schema.py``, which the
grammar and the parser enforce): the motion node's default clamps are those bounds, and each of its
limit parameters may only tighten its bound (:data:`LIMIT_RANGES`, the parameters' descriptor ranges).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from speculative_vlm.commands.schema import DEFAULT_LIMITS as BOUNDS


@dataclass(frozen=True)
class MotionLimits:
    """The motion node's limits (its ``max_vx``, ``min_vx``, ``max_vy``, ``max_vyaw``, ``max_duration_s``);
    by default the command schema's bounds."""

    max_vx: float = BOUNDS.max_vx  # m/s forward
    min_vx: float = BOUNDS.min_vx  # m/s backward (negative)
    max_vy: float = BOUNDS.max_vy  # m/s either side
    max_vyaw: float = BOUNDS.max_vyaw  # rad/s either way
    max_duration_s: float = BOUNDS.max_duration  # longest single MOVE

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> MotionLimits:
        """The limits of a motion node's ``ros__parameters`` (missing names keep their defaults)."""
        return cls(**{f.name: float(params[f.name]) for f in fields(cls) if f.name in params})

    def clamp_velocity(self, vx: float, vy: float, vyaw: float) -> tuple[float, float, float]:
        """Velocities inside the limits; a non-finite one becomes 0 (never a guess at what was meant)."""

        def clamp(v: float, lo: float, hi: float) -> float:
            return 0.0 if not math.isfinite(v) else max(lo, min(hi, v))

        return (
            clamp(vx, self.min_vx, self.max_vx),
            clamp(vy, -self.max_vy, self.max_vy),
            clamp(vyaw, -self.max_vyaw, self.max_vyaw),
        )

    def clamp_duration(self, duration: float) -> float:
        """A MOVE's duration inside [0, max_duration_s]; NaN becomes 0 (no motion)."""
        duration = min(max(float(duration), 0.0), self.max_duration_s)
        return duration if math.isfinite(duration) else 0.0


# The values each limit parameter of the motion node may take: from standing still (a MOVE of at least
# 0.1 s) up to the command schema's bound, never past it, so the robot is never allowed more than a
# verified command can say. A tighter robot (config/robot.yaml) sets smaller values.
LIMIT_RANGES: dict[str, tuple[float, float]] = {
    "max_vx": (0.0, BOUNDS.max_vx),
    "min_vx": (BOUNDS.min_vx, 0.0),
    "max_vy": (0.0, BOUNDS.max_vy),
    "max_vyaw": (0.0, BOUNDS.max_vyaw),
    "max_duration_s": (0.1, BOUNDS.max_duration),
}


# The sport requests each posture action becomes, in order (MOVE streams Move, STOP is StopMove,
# DONE sends nothing). StandUp locks the joints, so BalanceStand follows to make Move obeyed again.
SPORT_REQUESTS: dict[str, tuple[str, ...]] = {
    "stand_up": ("StandUp", "BalanceStand"),
    "stand_down": ("StopMove", "StandDown"),
    "sit": ("StopMove", "Sit"),
}
