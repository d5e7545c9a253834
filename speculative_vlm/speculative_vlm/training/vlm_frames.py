"""Camera frames for training the VLM target: the simulator's first-person view, varied so a vision tower
learns objects rather than one room.

Each training step of an expert rollout (:mod:`.target_data`) is rendered again from the pose the
robot stood at, with a :class:`Look` drawn from a seeded generator: the room's colours and floor
tiling, lighting (gain, colour cast, a light gradient), camera noise, blur and JPEG quality, the
objects' colours jittered inside their colour names' hue bands, and objects that exist only in the
picture: an *occluder* standing partly in front of a visible object, and *distractors* at the edge
of the view. Picture-only objects never share a colour/shape combination with the scene's objects
or the object the instruction names (the "absent" family asks for one that is not there), and they
are drawn only, never simulated, so the expert's command for the step stays right: the expert plans
on the ground truth and walks through nothing.

:data:`PLAIN` is the simulator's own look: its frames are byte-identical to what
``speculative-vlm eval`` and the robot's drafter send a VLM target (the camera's path: rendered at
the simulator's camera size, JPEG as the Go2 sends it, resized to the camera node's size, JPEG as
the drafter encodes it). Varied frames are rendered straight at the camera node's size (4x
cheaper), then lit, blurred, noised and encoded at their quality.
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from speculative_vlm.commands.scene_text import Pose
from speculative_vlm.evaluation.scenes import COLOUR_RGB, SIZES
from speculative_vlm.evaluation.world import WorldConfig
from speculative_vlm.go2.render import RenderStyle, encode_jpeg, render_bgr
from speculative_vlm.go2.scene import Scene, SceneObject

HALF_VIEW_DEG = 45.0  # the simulated camera's half field of view


@dataclass(frozen=True)
class Look:
    """How one frame looks: the room's style, what is drawn, the light and the camera's faults."""

    style: RenderStyle = field(default_factory=RenderStyle)
    objects: tuple[SceneObject, ...] | None = None  # what is drawn; None: the scene's own objects
    gain: float = 1.0  # overall brightness
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gain (BGR): the light's colour
    gradient: float = 0.0  # brightness from top to bottom: (1 - g) .. (1 + g)
    noise: float = 0.0  # std of Gaussian pixel noise, grey levels
    blur: float = 0.0  # Gaussian blur sigma, px (0: none)
    quality: int = 95  # JPEG quality of the encoded frame (the drafter's OpenCV default)
    noise_seed: int = 0
    occluded: str = ""  # the object an occluder partly hides ("" when none)
    extras: int = 0  # picture-only objects (occluder and distractors)

    @property
    def varied(self) -> bool:
        return self != PLAIN


PLAIN = Look()


@dataclass(frozen=True)
class Variation:
    """How often and how much frames vary (chances per frame; ranges drawn uniformly)."""

    plain: float = 0.15  # frames left exactly as the simulator renders them
    room: float = 0.8  # room colours and floor tiling changed
    occluder: float = 0.3  # a picture-only object partly in front of a visible one
    distractors: float = 0.35  # 1-2 picture-only objects near the edge of the view
    gain: tuple[float, float] = (0.6, 1.3)
    tint: float = 0.12  # per-channel gain within 1 +- this
    gradient: float = 0.25
    noise: tuple[float, float] = (0.0, 9.0)
    blur: float = 0.2  # chance of a blur of sigma 0.5-1.2 px
    quality: tuple[int, int] = (35, 95)
    colour_jitter: int = 18  # per channel, grey levels (inside each colour name's hue band)


def _grey_ish(rng: random.Random, lo: float, hi: float, saturation: float = 0.2) -> tuple[int, int, int]:
    """A low-saturation colour (BGR), so the room never looks like one of the objects' colours."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, saturation), rng.uniform(lo, hi))
    return int(b * 255), int(g * 255), int(r * 255)


def _room_style(rng: random.Random) -> RenderStyle:
    floor = _grey_ish(rng, 0.3, 0.75)
    step = rng.uniform(0.05, 0.2) * rng.choice((-1, 1))
    other = tuple(int(np.clip(c * (1 + step), 0, 255)) for c in floor)
    return RenderStyle(sky=_grey_ish(rng, 0.7, 0.98, 0.15), floor_a=floor, floor_b=other,
                       wall=_grey_ish(rng, 0.55, 0.95, 0.15), checker_m=rng.uniform(0.4, 2.0))


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.randint(-amount, amount), 0, 255)) for c in colour)


def _relative(obj: SceneObject, pose: Pose) -> tuple[float, float]:
    """(distance, bearing in rad, + left) of an object from the pose."""
    dx, dy = obj.x - pose.x, obj.y - pose.y
    return math.hypot(dx, dy), math.atan2(dy, dx) - pose.yaw


def _picture_object(combo: str, distance: float, bearing: float, pose: Pose, rng: random.Random) -> SceneObject:
    colour, shape = combo.split(" ")
    angle = pose.yaw + bearing
    return SceneObject(f"picture {combo}", shape, COLOUR_RGB[colour], pose.x + distance * math.cos(angle),
                       pose.y + distance * math.sin(angle), rng.uniform(*SIZES[shape]))


def _half_width(shape: str, size: float) -> float:
    """Half the width an object shows the camera, m (a box's edge is ``size``, a cone narrows to its apex)."""
    return size if shape == "ball" else size / 2


def _inside(scene: Scene, obj: SceneObject) -> bool:
    r = scene.room
    return r.x_min + 0.2 < obj.x < r.x_max - 0.2 and r.y_min + 0.2 < obj.y < r.y_max - 0.2


def random_look(rng: random.Random, scene: Scene, pose: Pose, combos: Sequence[str], named: str = "",
                variation: Variation = Variation()) -> Look:
    """A look for the frame at ``pose`` in ``scene``; ``combos`` are the colour/shape combinations picture-only
    objects may take (the split's: training frames never show a held-out one), ``named`` the one the
    instruction names."""
    if rng.random() < variation.plain:
        return PLAIN
    v = variation
    style = _room_style(rng) if rng.random() < v.room else RenderStyle()
    objects = [replace(o, colour=_jitter(o.colour, rng, v.colour_jitter)) for o in scene.objects]
    taken = {o.name.removeprefix("the ") for o in scene.objects} | {named}
    free = [c for c in combos if c not in taken]
    rng.shuffle(free)
    occluded, extras = "", 0
    visible = [(o, *_relative(o, pose)) for o in scene.objects]
    visible = [(o, d, b) for o, d, b in visible
               if d > 1.4 and abs(math.degrees(math.atan2(math.sin(b), math.cos(b)))) < HALF_VIEW_DEG - 5]
    if visible and free and rng.random() < v.occluder:
        obj, distance, bearing = rng.choice(visible)
        combo = free.pop()
        near = max(0.8, distance * rng.uniform(0.4, 0.75))
        size = rng.uniform(*SIZES[combo.split(" ")[1]])
        half_obj = math.atan2(_half_width(obj.shape, obj.size), distance)
        half_occ = math.atan2(_half_width(combo.split(" ")[1], size), near)
        # The occluder's inner edge falls inside the object, so (seen from the side) a third to four fifths of
        # it stays in view.
        side = rng.choice((-1, 1))
        centre = bearing + side * (rng.uniform(-0.3, 0.6) * half_obj + half_occ)
        occluder = replace(_picture_object(combo, near, centre, pose, rng), size=size)
        if _inside(scene, occluder):
            objects.append(occluder)
            occluded, extras = obj.name, extras + 1
    if free and rng.random() < v.distractors:
        for _ in range(rng.randint(1, 2)):
            if not free:
                break
            edge = math.radians(rng.uniform(HALF_VIEW_DEG - 8, HALF_VIEW_DEG + 4)) * rng.choice((-1, 1))
            extra = _picture_object(free.pop(), rng.uniform(1.2, 5.0), edge, pose, rng)
            if _inside(scene, extra) and all(math.hypot(extra.x - o.x, extra.y - o.y) > 0.6 for o in objects):
                objects.append(extra)
                extras += 1
    return Look(
        style=style, objects=tuple(objects), gain=rng.uniform(*v.gain),
        tint=tuple(rng.uniform(1 - v.tint, 1 + v.tint) for _ in range(3)),
        gradient=rng.uniform(-v.gradient, v.gradient), noise=rng.uniform(*v.noise),
        blur=rng.uniform(0.5, 1.2) if rng.random() < v.blur else 0.0, quality=rng.randint(*v.quality),
        noise_seed=rng.randrange(1 << 31), occluded=occluded, extras=extras,
    )


def render_frame(scene: Scene, pose: Pose, look: Look = PLAIN, config: WorldConfig | None = None) -> bytes:
    """The JPEG a VLM target gets for the robot at ``pose`` (see the module docstring for the path)."""
    config = config or WorldConfig()
    drawn = scene if look.objects is None else replace(scene, objects=look.objects)
    w, h = config.frame_size
    if look.varied and w and h:
        # Straight at the camera node's size: a quarter of the pixels of the simulator's camera (about
        # 4x faster), and the Go2's JPEG and the resize are within what the noise, blur and quality vary.
        camera = replace(config.camera, width=w, height=h)
        image = _light_and_camera(render_bgr(drawn, pose.x, pose.y, pose.yaw, camera, look.style), look)
    else:
        go2_jpeg = encode_jpeg(render_bgr(drawn, pose.x, pose.y, pose.yaw, config.camera, look.style))
        image = cv2.imdecode(np.frombuffer(go2_jpeg, np.uint8), cv2.IMREAD_COLOR)
        if w and h and (image.shape[1], image.shape[0]) != (w, h):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        if look.varied:
            image = _light_and_camera(image, look)
    ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), int(look.quality)])
    if not ok:
        raise RuntimeError("OpenCV could not encode the frame as JPEG")
    return buf.tobytes()


def _light_and_camera(image: np.ndarray, look: Look) -> np.ndarray:
    h = image.shape[0]
    light = look.gain * np.asarray(look.tint, np.float32)[None, None, :]
    light = light * (1.0 + look.gradient * np.linspace(-1.0, 1.0, h, dtype=np.float32))[:, None, None]
    out = image.astype(np.float32) * light
    if look.blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), look.blur)
    if look.noise > 0:
        out += np.random.default_rng(look.noise_seed).normal(0.0, look.noise, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)
