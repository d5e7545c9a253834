"""One episode's world in-process: the simulated Go2's dynamics, the motion node's rules, the camera.

The dynamics are the DDS simulator's own (:class:`~speculative_vlm.go2.sim_model.Go2Model`) on a
manual clock, so an episode runs as fast as the CPU allows and the same every time. A command is
executed as the motion node executes it (:mod:`speculative_vlm.go2.motion_rules`: clamped velocity
and duration, Move re-sent at the node's rate for the duration, then StopMove; posture actions as
their sport requests), then the robot is left to come to rest. The camera frame takes the graph's
path: rendered at the simulator's camera size, JPEG-encoded as the Go2's video service sends it,
decoded and resized as the camera node publishes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from unitree_sdk2py.go2.sport import sport_api as api

from speculative_vlm.commands.prompts import Progress
from speculative_vlm.commands.scene_text import Pose
from speculative_vlm.commands.schema import Action, LocomotionCommand
from speculative_vlm.go2.motion_rules import SPORT_REQUESTS, MotionLimits
from speculative_vlm.go2.render import CameraModel, encode_jpeg, render_bgr
from speculative_vlm.go2.scene import Scene
from speculative_vlm.go2.sim_model import Go2Model, Mode

SIM_CONFIG = Path(__file__).resolve().parents[2] / "config" / "sim.yaml"
_REQUEST_IDS = {
    "StopMove": api.SPORT_API_ID_STOPMOVE, "StandUp": api.SPORT_API_ID_STANDUP,
    "StandDown": api.SPORT_API_ID_STANDDOWN, "BalanceStand": api.SPORT_API_ID_BALANCESTAND,
    "Sit": api.SPORT_API_ID_SIT, "Move": api.SPORT_API_ID_MOVE,
}


@dataclass(frozen=True)
class WorldConfig:
    """What the in-process world copies from the graph it stands in for."""

    limits: MotionLimits = field(default_factory=MotionLimits)
    move_rate_hz: float = 25.0  # the motion node's Move rate
    frame_size: tuple[int, int] = (320, 240)  # the camera node's output (width, height); (0, 0) keeps it
    camera: CameraModel = field(default_factory=CameraModel)  # the simulator's camera
    physics_hz: float = 100.0  # the simulator's step rate
    settle_s: float = 2.0  # longest wait for the robot to come to rest after a command
    path_hz: float = 10.0  # trajectory samples kept for the plots
    progress_line: bool = True  # the drafter's progress_line: prompts tell the model its odometry
    perception: str = "scene_text"  # the drafter's perception: scene_text, or image (the frame to a VLM target)

    @classmethod
    def from_config(cls, path: str | Path = SIM_CONFIG) -> WorldConfig:
        """The motion limits, Move rate, camera size, progress line and perception of a bringup config (default:
        ``config/sim.yaml``)."""
        sections = yaml.safe_load(Path(path).read_text()) or {}
        motion = (sections.get("motion") or {}).get("ros__parameters") or {}
        camera = (sections.get("camera") or {}).get("ros__parameters") or {}
        drafter = (sections.get("drafter") or {}).get("ros__parameters") or {}
        return cls(
            limits=MotionLimits.from_params(motion),
            move_rate_hz=float(motion.get("move_rate_hz", 25.0)),
            frame_size=(int(camera.get("width", 0)), int(camera.get("height", 0))),
            progress_line=bool(drafter.get("progress_line", True)),
            perception=str(drafter.get("perception", "scene_text")),
        )


def camera_frame(video_jpeg: bytes, config: WorldConfig) -> np.ndarray:
    """The Go2 video service's JPEG as the camera node publishes it: decoded and resized to its output size."""
    import cv2

    image = cv2.imdecode(np.frombuffer(video_jpeg, np.uint8), cv2.IMREAD_COLOR)
    w, h = config.frame_size
    if w and h and (image.shape[1], image.shape[0]) != (w, h):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return image


def drafter_jpeg(scene: Scene, pose: Pose, config: WorldConfig) -> bytes:
    """The JPEG the drafter node sends a VLM target for the robot at ``pose``: the simulator's frame through
    the camera node, encoded as the drafter encodes it."""
    import cv2

    video = encode_jpeg(render_bgr(scene, pose.x, pose.y, pose.yaw, config.camera))
    return cv2.imencode(".jpg", camera_frame(video, config))[1].tobytes()


class ManualClock:
    """A monotonic clock that moves only when told (the simulator's dynamics read it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimWorld:
    """The simulated Go2 in a scene, driven command by command."""

    def __init__(self, scene: Scene, start_mode: Mode = Mode.BALANCE_STAND, config: WorldConfig | None = None):
        self.scene = scene
        self.config = config or WorldConfig()
        self.clock = ManualClock()
        self.model = Go2Model(None, scene.start_x, scene.start_y, scene.start_yaw, start_mode, clock=self.clock)
        self.start = Pose(scene.start_x, scene.start_y, scene.start_yaw)
        self.start_mode = start_mode
        self.progress = Progress(self.start)
        self.path: list[tuple[float, float, float]] = [(self.start.x, self.start.y, self.start.yaw)]
        self.max_offset = 0.0  # farthest the robot has been from its start, m
        self._next_sample = 0.0

    # ---- what there is to observe -------------------------------------------------------------
    def pose(self) -> Pose:
        s = self.model.snapshot()
        return Pose(s.x, s.y, s.yaw)

    def mode(self) -> Mode:
        return self.model.snapshot().mode

    def frame_jpeg(self) -> bytes:
        """The frame as the Go2's video service sends it (JPEG at the simulator's camera size)."""
        p = self.pose()
        return encode_jpeg(render_bgr(self.scene, p.x, p.y, p.yaw, self.config.camera))

    def frame_bgr(self) -> np.ndarray:
        """The frame as the camera node publishes it: decoded and resized to its output size."""
        return camera_frame(self.frame_jpeg(), self.config)

    # ---- acting -------------------------------------------------------------------------------
    def execute(self, command: LocomotionCommand) -> LocomotionCommand:
        """Run one command as the motion node would, then let the robot come to rest; returns the command
        as the motion node ran it (velocities and duration clamped to its limits)."""
        limits = self.config.limits
        if command.action == Action.MOVE:
            vx, vy, vyaw = limits.clamp_velocity(command.vx, command.vy, command.vyaw)
            duration = limits.clamp_duration(command.duration)
            if duration > 0.0:
                self._stream_move(vx, vy, vyaw, duration)
            self._request("StopMove")
            executed = LocomotionCommand(Action.MOVE, vx, vy, vyaw, duration)
        elif command.action == Action.STOP:
            self._request("StopMove")
            executed = LocomotionCommand(Action.STOP)
        elif command.action.value in SPORT_REQUESTS:
            for name in SPORT_REQUESTS[command.action.value]:
                self._request(name)
            executed = LocomotionCommand(command.action)
        else:  # DONE sends nothing
            return LocomotionCommand(command.action)
        self._settle()
        return executed

    def _request(self, name: str, parameter: str = "") -> int:
        return self.model.handle(_REQUEST_IDS[name], parameter)

    def _stream_move(self, vx: float, vy: float, vyaw: float, duration: float) -> None:
        period, dt = 1.0 / self.config.move_rate_hz, 1.0 / self.config.physics_hz
        start = self.clock.now
        next_move = start
        move = json.dumps({"x": vx, "y": vy, "z": vyaw})
        while self.clock.now - start < duration - 1e-9:
            if self.clock.now >= next_move - 1e-9:
                self._request("Move", move)
                next_move += period
            self._tick(dt)

    def _settle(self) -> None:
        dt = 1.0 / self.config.physics_hz
        deadline = self.clock.now + self.config.settle_s
        self._tick(dt)
        while self.clock.now < deadline:
            s = self.model.snapshot()
            if s.vx == s.vy == s.vyaw == 0.0:
                break
            self._tick(dt)
        self._sample(force=True)

    def _tick(self, dt: float) -> None:
        self.clock.now += dt
        self.model.step()
        self._sample()

    def _sample(self, force: bool = False) -> None:
        p = self.pose()
        self.progress.update(p)
        self.max_offset = max(self.max_offset, math.hypot(p.x - self.start.x, p.y - self.start.y))
        if force or self.clock.now >= self._next_sample:
            self.path.append((p.x, p.y, p.yaw))
            self._next_sample = self.clock.now + 1.0 / self.config.path_hz
