"""The scene describer: what coloured objects are where, as text for a text-only target.

No VLM weights can be had offline, so a text-only target is told what the camera sees.
Two sources give the same kind of sentence:

* :func:`describe_objects` turns a structured scene (named objects at world x, y and the
  robot's pose) into distances and bearings relative to the robot; the training prompts
  and the simulator's ground truth use it.
* :func:`describe_image` segments saturated colour blobs in a BGR camera frame with
  OpenCV and estimates each blob's bearing (from its column and the camera's field of
  view) and rough distance (from its apparent height and an assumed object size).

Bearings are positive to the robot's left, as ``vyaw`` is, so a model can copy the sign.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Pose:
    """The robot's pose in the world: metres, and yaw in radians (0 looks along +x)."""

    x: float = 0.0
    y: float = 0.0
    yaw: float = 0.0


@dataclass(frozen=True)
class NamedPoint:
    """A named object (``"red ball"``) at a world position in metres."""

    name: str
    x: float
    y: float


@dataclass(frozen=True)
class Sighting:
    """An object relative to the robot: distance in metres, bearing in degrees (+ is left)."""

    name: str
    distance: float
    bearing: float


def _direction(bearing: float) -> str:
    b = round(bearing)
    if abs(b) < 5:
        return "straight ahead"
    side = "left" if b > 0 else "right"
    where = "ahead" if abs(b) <= 90 else "behind"
    return f"{where}, {abs(b)} degrees to the {side}"


def _bare(name: str) -> str:
    # Scene files say "the red ball"; prompts say "red ball" so the text reads the same.
    return name[4:] if name.lower().startswith("the ") else name


def describe_sightings(sightings: Iterable[Sighting], approximate: bool = False) -> str:
    """One sentence per object, nearest first; a fixed wording the draft can learn."""
    ordered = sorted(sightings, key=lambda s: s.distance)
    if not ordered:
        return "no coloured objects in view."
    about = "about " if approximate else ""
    parts = [f"{_bare(s.name)}: {about}{s.distance:.1f} m away, {_direction(s.bearing)}" for s in ordered]
    return "; ".join(parts) + "."


def relative(obj: NamedPoint, pose: Pose) -> Sighting:
    """Where an object is as seen from the robot."""
    dx, dy = obj.x - pose.x, obj.y - pose.y
    # Rotate the world offset into the robot frame (x forward, y left).
    fx = math.cos(pose.yaw) * dx + math.sin(pose.yaw) * dy
    fy = -math.sin(pose.yaw) * dx + math.cos(pose.yaw) * dy
    return Sighting(obj.name, math.hypot(fx, fy), math.degrees(math.atan2(fy, fx)))


def describe_objects(
    objects: Sequence[NamedPoint | tuple[str, float, float]], pose: Pose | tuple[float, float, float] = Pose()
) -> str:
    """Text for a structured scene: each object's distance and bearing from the robot.

    ``objects`` are :class:`NamedPoint` or ``(name, x, y)`` tuples in world metres;
    ``pose`` is a :class:`Pose` or ``(x, y, yaw)``.
    """
    pose = pose if isinstance(pose, Pose) else Pose(*pose)
    objs = [o if isinstance(o, NamedPoint) else NamedPoint(*o) for o in objects]
    return describe_sightings(relative(o, pose) for o in objs)


# OpenCV hue runs 0..179. Upper bounds, in order; red wraps around at both ends.
_HUES = ((8, "red"), (20, "orange"), (35, "yellow"), (85, "green"), (100, "cyan"), (130, "blue"),
         (160, "purple"), (170, "pink"), (180, "red"))
COLOUR_NAMES = tuple(dict.fromkeys(name for _, name in _HUES))  # every colour a blob can be named


@dataclass(frozen=True)
class DescriberCamera:
    """What the describer assumes about the camera and the objects it looks at.

    The defaults match the simulated Go2's front camera (``go2/render.py``); give the real
    camera's field of view and mounting height on a robot.
    """

    hfov_deg: float = 90.0  # horizontal field of view
    mount_height_m: float = 0.3  # camera height above the floor
    object_height_m: float = 0.3  # assumed object height, when its floor contact is not visible
    min_saturation: int = 110  # below this a pixel is grey, not a coloured object
    min_value: int = 60  # below this it is too dark to name its colour
    min_area_frac: float = 0.0004  # blobs smaller than this share of the frame are noise


@dataclass(frozen=True)
class Blob:
    """A coloured region of the frame and what it suggests about the object."""

    colour: str
    shape: str
    area_px: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    distance: float
    bearing: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def _colour_of(hue: float) -> str:
    for upper, name in _HUES:
        if hue < upper:
            return name
    return "red"


def _shape_of(mask: np.ndarray, area: int, w: int, h: int) -> str:
    import cv2

    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    perimeter = max(cv2.arcLength(contour, True), 1.0)
    circularity = 4 * math.pi * area / perimeter**2
    fill = area / max(w * h, 1)
    # A filled square is fairly circular too (pi/4), so test the fill of the box first.
    if fill > 0.85:
        return "box"
    # A cone stands on its base: its top third is far narrower than its bottom third, which
    # still holds for a cone a few pixels tall, where blur makes its outline look round.
    third = max(h // 3, 1)
    if h >= 6 and mask[:third].sum() < 0.55 * mask[-third:].sum():
        return "cone"
    if circularity > 0.75 and 0.75 < w / max(h, 1) < 1.33:
        return "ball"
    if len(cv2.approxPolyDP(contour, 0.06 * perimeter, True)) == 3:
        return "cone"
    return "object"


def detect_blobs(bgr: np.ndarray, camera: DescriberCamera = DescriberCamera()) -> list[Blob]:
    """Saturated colour blobs in a BGR frame, largest first, with bearing and rough distance."""
    import cv2

    if bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"expected a BGR image of shape (H, W, 3), got {bgr.shape}")
    height, width = bgr.shape[:2]
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = (sat >= camera.min_saturation) & (val >= camera.min_value)
    focal = (width / 2) / math.tan(math.radians(camera.hfov_deg) / 2)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    min_area = max(int(camera.min_area_frac * width * height), 4)
    kernel = np.ones((3, 3), np.uint8)
    blobs: list[Blob] = []
    bands: dict[str, np.ndarray] = {}
    lower = 0
    for upper, name in _HUES:
        # Red wraps around the hue circle: both of its ends make one band, or a red object's
        # pixels on either side of 0 would be cut apart and its shape lost.
        in_band = coloured & (hue >= lower) & (hue < upper)
        bands[name] = bands[name] | in_band if name in bands else in_band
        lower = upper
    for name, band in bands.items():
        if not band.any():
            continue
        mask = cv2.morphologyEx(band.astype(np.uint8) * 255, cv2.MORPH_OPEN, kernel)
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for i in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[i])
            if area < min_area:
                continue
            bottom = y + h - 1
            if bottom > cy + 2:
                # Objects stand on the floor: the row where the blob meets it gives the
                # forward depth from the camera's height, whatever the object's size.
                forward = camera.mount_height_m * focal / (bottom - cy)
            else:
                forward = focal * camera.object_height_m / max(h, 1)
            lateral = forward * (cx - centroids[i][0]) / focal
            shape = _shape_of((labels[y:y + h, x:x + w] == i).astype(np.uint8), area, w, h)
            blobs.append(Blob(name, shape, area, (x, y, w, h), math.hypot(forward, lateral),
                              math.degrees(math.atan2(lateral, forward))))
    blobs.sort(key=lambda b: -b.area_px)
    return blobs


def describe_image(bgr: np.ndarray, camera: DescriberCamera = DescriberCamera(), max_objects: int = 5) -> str:
    """Text for a camera frame: the largest coloured blobs, their bearing and rough distance."""
    blobs = detect_blobs(bgr, camera)[:max_objects]
    return describe_sightings((Sighting(b.name, b.distance, b.bearing) for b in blobs), approximate=True)
