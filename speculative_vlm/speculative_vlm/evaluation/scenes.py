"""Random scenes for episodes: a room, the robot's start pose and coloured objects placed by a layout.

Objects are placed relative to the robot's start pose (distance and bearing), so an episode can ask
for an object behind the robot, out of view, or straight ahead. A layout decides where the other
objects (distractors) stand: train-like layouts (scatter, row, cluster) and held-out ones (arc,
ring, corridor) never share a scene. Objects keep apart, stay inside the room, and a nearer object
never stands in front of the named one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from speculative_vlm.commands.scene_text import Pose
from speculative_vlm.go2.scene import Room, Scene, SceneObject

ROOM = Room(x_min=-6.0, x_max=6.0, y_min=-5.0, y_max=5.0, wall_height=1.0)
# RGB per colour name, inside the hue bands the scene describer reads (commands/scene_text.py).
COLOUR_RGB = {
    "red": (220, 30, 30), "orange": (240, 130, 20), "yellow": (230, 210, 30),
    "green": (30, 180, 60), "blue": (30, 60, 220), "purple": (140, 40, 200),
}
SIZES = {"ball": (0.15, 0.22), "box": (0.3, 0.45), "cone": (0.15, 0.2)}  # radius / edge / base radius
MARGIN_M = 0.5  # objects keep this far from the walls
SPACING_M = 0.9  # ... and from each other
CLEAR_M = 0.7  # ... and from the robot's start
OCCLUSION_DEG = 12.0  # a nearer distractor keeps at least this bearing away from the named object

Placement = tuple[float, float]  # distance (m), bearing (rad, + left) from the start pose


def _scatter(rng: random.Random) -> list[Placement]:
    return [(rng.uniform(1.5, 5.0), rng.uniform(-math.pi, math.pi)) for _ in range(rng.randint(1, 3))]


def _row(rng: random.Random) -> list[Placement]:
    forward, count = rng.uniform(2.5, 4.0), rng.randint(2, 3)
    shift = rng.uniform(-1.0, 1.0)
    lateral = [shift + 1.2 * (i - (count - 1) / 2) for i in range(count)]
    return [(math.hypot(forward, y), math.atan2(y, forward)) for y in lateral]


def _cluster(rng: random.Random) -> list[Placement]:
    d, b = rng.uniform(2.0, 4.0), rng.uniform(-math.pi, math.pi)
    cx, cy = d * math.cos(b), d * math.sin(b)
    out = []
    for _ in range(rng.randint(2, 3)):
        r, a = rng.uniform(0.0, 1.2), rng.uniform(-math.pi, math.pi)
        x, y = cx + r * math.cos(a), cy + r * math.sin(a)
        out.append((math.hypot(x, y), math.atan2(y, x)))
    return out


def _arc(rng: random.Random) -> list[Placement]:
    r, count = rng.uniform(2.0, 4.0), rng.randint(2, 3)
    return [(r + rng.uniform(-0.2, 0.2), math.radians(-60 + 120 * (i + 0.5) / count + rng.uniform(-8, 8)))
            for i in range(count)]


def _ring(rng: random.Random) -> list[Placement]:
    r, count, offset = rng.uniform(2.0, 3.5), rng.randint(3, 4), rng.uniform(0, 2 * math.pi)
    return [(r, math.atan2(math.sin(offset + 2 * math.pi * i / count), math.cos(offset + 2 * math.pi * i / count)))
            for i in range(count)]


def _corridor(rng: random.Random) -> list[Placement]:
    out = []
    for i in range(rng.randint(2, 4)):
        forward, y = 1.5 + 1.2 * i, (1 if i % 2 == 0 else -1) * rng.uniform(1.2, 1.6)
        out.append((math.hypot(forward, y), math.atan2(y, forward)))
    return out


LAYOUTS: dict[str, Callable[[random.Random], list[Placement]]] = {
    "scatter": _scatter, "row": _row, "cluster": _cluster, "arc": _arc, "ring": _ring, "corridor": _corridor,
}


def random_start(rng: random.Random) -> Pose:
    """A start pose well inside the room, facing anywhere."""
    return Pose(round(rng.uniform(-2.5, 2.5), 2), round(rng.uniform(-2.0, 2.0), 2), round(rng.uniform(-math.pi, math.pi), 3))


def make_object(combo: str, x: float, y: float, rng: random.Random) -> SceneObject:
    """A scene object named ``the <combo>`` at (x, y), with its colour's RGB and a random size."""
    colour, shape = combo.split(" ")
    lo, hi = SIZES[shape]
    return SceneObject(f"the {combo}", shape, COLOUR_RGB[colour], round(x, 2), round(y, 2), round(rng.uniform(lo, hi), 3))


def _world(start: Pose, distance: float, bearing: float) -> tuple[float, float]:
    return (start.x + distance * math.cos(start.yaw + bearing), start.y + distance * math.sin(start.yaw + bearing))


def _inside(x: float, y: float) -> bool:
    return ROOM.x_min + MARGIN_M < x < ROOM.x_max - MARGIN_M and ROOM.y_min + MARGIN_M < y < ROOM.y_max - MARGIN_M


def _angle(a: float) -> float:
    return math.atan2(math.sin(a), math.cos(a))


def make_scene(
    rng: random.Random,
    start: Pose,
    layout: str,
    combos: Sequence[str],
    target: tuple[str, float, float] | None = None,
    avoid: Sequence[str] = (),
) -> Scene | None:
    """A scene with ``target`` = (combo, distance, bearing) placed exactly and distractors by ``layout``.

    Distractors take combinations from ``combos`` (never the target's or one in ``avoid``); one that
    does not fit (wall, spacing, occlusion) is left out. Returns None when the target itself does not
    fit in the room (the caller draws again).
    """
    objects: list[SceneObject] = []
    if target is not None:
        combo, distance, bearing = target
        x, y = _world(start, distance, bearing)
        if not _inside(x, y):
            return None
        objects.append(make_object(combo, x, y, rng))
    free = [c for c in combos if c not in avoid and (target is None or c != target[0])]
    rng.shuffle(free)
    for distance, bearing in LAYOUTS[layout](rng):
        if not free:
            break
        x, y = _world(start, distance, bearing)
        if not _inside(x, y) or math.hypot(x - start.x, y - start.y) < CLEAR_M:
            continue
        if any(math.hypot(x - o.x, y - o.y) < SPACING_M for o in objects):
            continue
        if target is not None and distance < target[1] and abs(_angle(bearing - target[2])) < math.radians(OCCLUSION_DEG):
            continue
        objects.append(make_object(free.pop(), x, y, rng))
    return Scene(ROOM, tuple(objects), start.x, start.y, start.yaw)
