"""The simulated Go2's world: a rectangular room and a few coloured objects, read from YAML.

Coordinates are the odometry frame of the simulated robot (REP 103: x forward from the
start pose, y left, metres). Other code (benchmarks, end-to-end tests) uses
:meth:`Scene.distance_to` to measure how close the robot got to a named object.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

SHAPES = ("ball", "box", "cone")


class SceneError(ValueError):
    """A scene file that cannot be used; the message names the offending entry."""


@dataclass(frozen=True)
class SceneObject:
    name: str  # how instructions refer to it, e.g. "the red ball"
    shape: str  # one of SHAPES
    colour: tuple[int, int, int]  # RGB, 0..255
    x: float
    y: float
    size: float  # ball: radius; box: edge length; cone: base radius (height is 2x)


@dataclass(frozen=True)
class Room:
    x_min: float = -2.0
    x_max: float = 8.0
    y_min: float = -4.0
    y_max: float = 4.0
    wall_height: float = 1.0


@dataclass(frozen=True)
class Scene:
    room: Room = field(default_factory=Room)
    objects: tuple[SceneObject, ...] = ()
    start_x: float = 0.0
    start_y: float = 0.0
    start_yaw: float = 0.0

    def find(self, name: str) -> SceneObject:
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise KeyError(f"no object named {name!r} in the scene; objects: {[o.name for o in self.objects]}")

    def distance_to(self, name: str, x: float, y: float) -> float:
        """Planar distance from (x, y) to the centre of the named object, metres."""
        obj = self.find(name)
        return math.hypot(obj.x - x, obj.y - y)

    def named_in(self, text: str) -> SceneObject | None:
        """The object ``text`` (an instruction) names, e.g. "walk to the red ball"; None if none does.

        Names match as whole words, case-insensitively, with or without their leading "the"; when
        several match ("ball" and "red ball") the longest name wins.
        """
        said = f" {_words(text)} "
        named = [(len(name), obj) for obj in self.objects
                 if (name := _words(obj.name.lower().removeprefix("the "))) and f" {name} " in said]
        return max(named, key=lambda n: n[0])[1] if named else None


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _float(entry: dict, key: str, where: str, default: float | None = None) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SceneError(f"{where}: {key!r} must be a finite number, got {value!r}")
    return float(value)


def scene_from_dict(data: dict) -> Scene:
    """Build a scene from parsed YAML, checking every field."""
    if not isinstance(data, dict):
        raise SceneError("a scene file must be a mapping with 'room', 'start' and 'objects'")
    r = data.get("room", {}) or {}
    room = Room(**{k: _float(r, k, "room", getattr(Room, k)) for k in Room.__dataclass_fields__})
    if room.x_min >= room.x_max or room.y_min >= room.y_max or room.wall_height <= 0:
        raise SceneError(f"room bounds are empty or inverted: {room}")
    s = data.get("start", {}) or {}
    start = (_float(s, "x", "start", 0.0), _float(s, "y", "start", 0.0), _float(s, "yaw", "start", 0.0))
    objects = []
    for i, o in enumerate(data.get("objects", []) or []):
        where = f"objects[{i}]"
        if not isinstance(o, dict) or not isinstance(o.get("name"), str) or not o["name"]:
            raise SceneError(f"{where}: needs a non-empty 'name'")
        if o.get("shape") not in SHAPES:
            raise SceneError(f"{where} ({o['name']}): shape must be one of {SHAPES}, got {o.get('shape')!r}")
        colour = o.get("colour")
        if (
            not isinstance(colour, list)
            or len(colour) != 3
            or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        ):
            raise SceneError(f"{where} ({o['name']}): colour must be [r, g, b] with 0..255 integers")
        size = _float(o, "size", where, 0.2)
        if size <= 0:
            raise SceneError(f"{where} ({o['name']}): size must be positive")
        x, y = _float(o, "x", where), _float(o, "y", where)
        if not (room.x_min < x < room.x_max and room.y_min < y < room.y_max):
            raise SceneError(f"{where} ({o['name']}): ({x}, {y}) is outside the room")
        objects.append(SceneObject(o["name"], o["shape"], tuple(colour), x, y, size))
    names = [o.name for o in objects]
    if len(set(names)) != len(names):
        raise SceneError(f"object names must be unique: {names}")
    return Scene(room, tuple(objects), *start)


def packaged_scenes() -> list[str]:
    """Names of the scenes shipped in ``speculative_vlm/go2/scenes/``."""
    folder = resources.files("speculative_vlm.go2").joinpath("scenes")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_scene(path: str | Path | None = None) -> Scene:
    """Load a scene: a YAML file path, the name of a packaged scene, or ``None`` for "default"."""
    if path is None or (isinstance(path, str) and not Path(path).exists() and "/" not in path and not path.endswith(".yaml")):
        name = path or "default"
        if name not in packaged_scenes():
            raise SceneError(f"no packaged scene {name!r}; packaged: {packaged_scenes()}, or give a YAML path")
        text = resources.files("speculative_vlm.go2").joinpath(f"scenes/{name}.yaml").read_text()
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SceneError(f"cannot read scene file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SceneError(f"scene file {path or 'default'} is not valid YAML: {exc}") from exc
    return scene_from_dict(data)
