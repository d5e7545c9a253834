"""Episodes: a scene, a start posture and an instruction from one family, drawn reproducibly.

:func:`generate_episodes` deals the families round-robin and draws episode ``i`` of a split from
its own seeded generator (``"<seed>:<split>:<i>"``), so any episode can be rebuilt alone and a
larger run extends a smaller one. Each family places its named object where the family needs it:
go to (in view, or anywhere including behind), face (anywhere), back away (ahead), find (outside
the camera's view), absent (not in the scene at all).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from speculative_vlm.evaluation import scenes
from speculative_vlm.evaluation.families import (
    BACK_AWAY_M,
    DEFAULT_SIDESTEP_M,
    DEFAULT_TURN_DEG,
    STEP_LIMITS,
    Family,
    Intent,
)
from speculative_vlm.evaluation.phrasings import phrase
from speculative_vlm.evaluation.splits import Split
from speculative_vlm.go2.scene import Scene
from speculative_vlm.go2.sim_model import Mode

FAMILIES = tuple(Family)
WALK_M = {1: (0.5, 1.0, 1.5, 2.0, 2.5, 3.0), -1: (0.5, 1.0, 1.5, 2.0)}
TURN_DEG = (30, 45, 60, 90, 120, 180)
SIDESTEP_M = (0.5, 1.0)
POSTURES = ("sit", "stand_down", "stand_up")


@dataclass(frozen=True)
class Episode:
    """One evaluation episode."""

    id: str  # "<split>-<index>"
    split: str
    layout: str
    intent: Intent
    instruction: str
    scene: Scene  # the room, the objects and the robot's start pose
    start_mode: Mode = Mode.BALANCE_STAND
    max_steps: int = 8


def _deg(lo: float, hi: float, rng: random.Random) -> float:
    return math.radians(rng.uniform(lo, hi))


def _target_placement(family: Family, rng: random.Random) -> tuple[float, float]:
    """(distance, bearing) of the named object for the families that place one."""
    if family == Family.GO_TO:
        in_view = rng.random() < 0.6
        return rng.uniform(1.2, 5.0), _deg(-35, 35, rng) if in_view else _deg(-180, 180, rng)
    if family == Family.FACE:
        turn = rng.random() < 0.9
        return rng.uniform(1.2, 5.0), rng.choice((-1, 1)) * (_deg(20, 180, rng) if turn else _deg(0, 10, rng))
    if family == Family.BACK_AWAY:
        return rng.uniform(0.9, 2.5), _deg(-25, 25, rng)
    return rng.uniform(1.5, 5.0), rng.choice((-1, 1)) * _deg(60, 180, rng)  # FIND


def _intent(family: Family, split: Split, rng: random.Random) -> tuple[Intent, bool]:
    """The intent and whether its instruction states the amount."""
    given = True
    if family in (Family.GO_TO, Family.FACE, Family.FIND, Family.ABSENT):
        intent = Intent(family, target=rng.choice(split.target_combos))
    elif family == Family.BACK_AWAY:
        intent = Intent(family, target=rng.choice(split.target_combos), amount=BACK_AWAY_M)
    elif family == Family.WALK:
        direction = 1 if rng.random() < 0.6 else -1
        intent = Intent(family, direction=direction, amount=rng.choice(WALK_M[direction]))
    elif family == Family.TURN:
        given = rng.random() < 0.7
        intent = Intent(family, direction=rng.choice((-1, 1)),
                        amount=float(rng.choice(TURN_DEG)) if given else DEFAULT_TURN_DEG)
    elif family == Family.SIDESTEP:
        given = rng.random() < 0.6
        intent = Intent(family, direction=rng.choice((-1, 1)),
                        amount=rng.choice(SIDESTEP_M) if given else DEFAULT_SIDESTEP_M)
    elif family == Family.POSTURE:
        intent = Intent(family, kind=rng.choice(POSTURES))
    elif family == Family.REFUSE:
        intent = Intent(family, kind=rng.choices(("unsafe", "gibberish", "empty"), weights=(6, 3, 1))[0])
    else:
        intent = Intent(family)
    return intent, given


def make_episode(split: Split, family: Family, index: int, seed: int = 0) -> Episode:
    """Episode ``index`` of ``split`` for a seed: the same arguments always give the same episode."""
    rng = random.Random(f"{seed}:{split.name}:{index}")
    intent, given = _intent(family, split, rng)
    layout = rng.choice(split.layouts)
    placed = family in (Family.GO_TO, Family.FACE, Family.BACK_AWAY, Family.FIND)
    avoid = (intent.target,) if family == Family.ABSENT else ()
    for _ in range(200):
        start = scenes.random_start(rng)
        target = (intent.target, *_target_placement(family, rng)) if placed else None
        scene = scenes.make_scene(rng, start, layout, split.combos, target, avoid)
        if scene is not None:
            break
    else:  # pragma: no cover - the room is large enough for every placement
        raise RuntimeError(f"could not place {intent} in the room after 200 draws")
    start_mode = Mode.LIE_DOWN if intent.kind == "stand_up" else Mode.BALANCE_STAND
    return Episode(
        id=f"{split.name}-{index:04d}", split=split.name, layout=layout, intent=intent,
        instruction=phrase(intent, split.name, rng, given_amount=given), scene=scene,
        start_mode=start_mode, max_steps=STEP_LIMITS[family],
    )


def generate_episodes(
    split: Split, count: int, seed: int = 0, families: Sequence[Family] = FAMILIES, start: int = 0
) -> list[Episode]:
    """``count`` episodes of ``split``, the families dealt in turn (episode i has family i mod n)."""
    families = tuple(families)
    return [make_episode(split, families[i % len(families)], i, seed) for i in range(start, start + count)]
