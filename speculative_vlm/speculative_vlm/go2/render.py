"""First-person camera images of a :class:`~speculative_vlm.go2.scene.Scene` (numpy + OpenCV).

A pinhole camera at the robot's pose, looking along its heading: a checkered floor (so
motion is visible), grey walls found by casting one ray per image column, and the
objects drawn far-to-near as filled shapes. Good enough for a VLM to tell "a red ball
ahead-left" from "a blue box on the right"; not a physics renderer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from speculative_vlm.go2.scene import Scene, SceneObject


@dataclass(frozen=True)
class CameraModel:
    width: int = 640
    height: int = 480
    hfov_deg: float = 90.0
    mount_height: float = 0.3  # m above the floor (Go2 front camera when standing)

    @property
    def fx(self) -> float:
        return (self.width / 2.0) / math.tan(math.radians(self.hfov_deg) / 2.0)

    @property
    def cx(self) -> float:
        return (self.width - 1) / 2.0

    @property
    def cy(self) -> float:
        return (self.height - 1) / 2.0


@dataclass(frozen=True)
class RenderStyle:
    """How the room looks: colours (BGR) and the floor's checker size. The defaults are the simulator's room;
    training varies them (:mod:`speculative_vlm.training.vlm_frames`) so a vision encoder does not learn one room."""

    sky: tuple[int, int, int] = (235, 225, 215)
    floor_a: tuple[int, int, int] = (150, 150, 150)
    floor_b: tuple[int, int, int] = (120, 120, 120)
    wall: tuple[int, int, int] = (200, 205, 210)
    checker_m: float = 1.0  # side of a floor tile, m


def render_bgr(scene: Scene, x: float, y: float, yaw: float, camera: CameraModel = CameraModel(),
               style: RenderStyle = RenderStyle()) -> np.ndarray:
    """Render the view from pose (x, y, yaw) as a BGR uint8 image of the camera's size."""
    w, h, f, cx, cy, ch = camera.width, camera.height, camera.fx, camera.cx, camera.cy, camera.mount_height
    img = np.empty((h, w, 3), np.uint8)
    img[:] = np.array(style.sky, np.uint8)
    cos_y, sin_y = math.cos(yaw), math.sin(yaw)

    # Per column: the ray direction in the world and the distance to the wall it hits.
    u = np.arange(w, dtype=np.float64)
    left = -(u - cx) / f  # lateral offset per unit forward (left positive)
    dir_x = cos_y - left * sin_y
    dir_y = sin_y + left * cos_y
    room = scene.room
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = np.where(dir_x > 0, (room.x_max - x) / dir_x, np.where(dir_x < 0, (room.x_min - x) / dir_x, np.inf))
        ty = np.where(dir_y > 0, (room.y_max - y) / dir_y, np.where(dir_y < 0, (room.y_min - y) / dir_y, np.inf))
    wall_depth = np.maximum(np.minimum(tx, ty), 1e-3)  # forward depth, since the ray has unit forward part

    # Floor: every pixel below the horizon sees the floor at depth ch * f / (v - cy).
    v = np.arange(h, dtype=np.float64)
    below = v > cy + 0.5
    depth_floor = np.full(h, np.inf)
    depth_floor[below] = ch * f / (v[below] - cy)
    fx_world = x + depth_floor[:, None] * dir_x[None, :]
    fy_world = y + depth_floor[:, None] * dir_y[None, :]
    with np.errstate(invalid="ignore"):
        checker = (np.floor(fx_world / style.checker_m) + np.floor(fy_world / style.checker_m)) % 2 == 0
    floor_mask = below[:, None] & (depth_floor[:, None] < wall_depth[None, :])
    img[floor_mask & checker] = np.array(style.floor_a, np.uint8)
    img[floor_mask & ~checker] = np.array(style.floor_b, np.uint8)

    # Walls: between the floor line and the wall top in each column, shaded by distance.
    top = cy - f * (room.wall_height - ch) / wall_depth
    bottom = cy + f * ch / wall_depth
    rows = v[:, None]
    wall_mask = (rows >= top[None, :]) & (rows <= bottom[None, :])
    shade = np.clip(1.0 - wall_depth / 30.0, 0.5, 1.0)
    wall_rgb = (np.array(style.wall, np.float64)[None, :] * shade[:, None]).astype(np.uint8)
    img[wall_mask] = np.broadcast_to(wall_rgb[None, :, :], (h, w, 3))[wall_mask]

    # Objects, far to near so nearer ones cover farther ones.
    placed = []
    for obj in scene.objects:
        dx, dy = obj.x - x, obj.y - y
        fwd = dx * cos_y + dy * sin_y
        lat = -dx * sin_y + dy * cos_y
        if fwd > 0.15:
            placed.append((fwd, lat, obj))
    for fwd, lat, obj in sorted(placed, key=lambda p: -p[0]):
        _draw_object(img, obj, fwd, lat, camera)
    return img


def _project(fwd: float, lat: float, z: float, camera: CameraModel) -> tuple[float, float]:
    f = camera.fx
    return camera.cx - f * lat / fwd, camera.cy + f * (camera.mount_height - z) / fwd


def _draw_object(img: np.ndarray, obj: SceneObject, fwd: float, lat: float, camera: CameraModel) -> None:
    bgr = (int(obj.colour[2]), int(obj.colour[1]), int(obj.colour[0]))
    dark = tuple(int(c * 0.6) for c in bgr)
    f = camera.fx
    s = obj.size
    if obj.shape == "ball":
        u, v = _project(fwd, lat, s, camera)
        r = max(1, int(round(f * s / fwd)))
        cv2.circle(img, (int(round(u)), int(round(v))), r, dark, -1, cv2.LINE_AA)
        cv2.circle(img, (int(round(u - 0.2 * r)), int(round(v - 0.2 * r))), max(1, int(0.75 * r)), bgr, -1, cv2.LINE_AA)
    elif obj.shape == "box":
        near = max(fwd - s / 2, 0.1)
        u0, v0 = _project(near, lat + s / 2, s, camera)
        u1, v1 = _project(near, lat - s / 2, 0.0, camera)
        cv2.rectangle(img, (int(round(u0)), int(round(v0))), (int(round(u1)), int(round(v1))), bgr, -1)
        cv2.rectangle(img, (int(round(u0)), int(round(v0))), (int(round(u1)), int(round(v1))), dark, 2)
    else:  # cone
        ua, va = _project(fwd, lat, 2 * s, camera)
        ul, vl = _project(fwd, lat + s, 0.0, camera)
        ur, vr = _project(fwd, lat - s, 0.0, camera)
        pts = np.array([[ua, va], [ul, vl], [ur, vr]], dtype=np.float64).round().astype(np.int32)
        cv2.fillConvexPoly(img, pts, bgr, cv2.LINE_AA)


def encode_jpeg(image_bgr: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of a BGR image, as the Go2 video service sends them."""
    ok, buf = cv2.imencode(".jpg", image_bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not encode the frame as JPEG")
    return buf.tobytes()


def with_noise(jpeg: bytes, std: float, seed: int, quality: int = 85) -> bytes:
    """``jpeg`` with Gaussian pixel noise of ``std`` grey levels added (seeded), encoded again: a noisier camera."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a JPEG frame")
    noisy = image.astype(np.float32) + np.random.default_rng(seed).normal(0.0, std, image.shape).astype(np.float32)
    return encode_jpeg(np.clip(noisy, 0, 255).astype(np.uint8), quality)
