"""The simulated Go2: a real DDS peer that answers the SDK's sport and video requests.

It is built from unitree_sdk2py's own server side (``rpc.server.Server``) on the SDK's
CycloneDDS participant, so a ``SportClient`` or ``VideoClient`` talks to it exactly as to
the robot: requests on ``rt/api/sport/request``, replies on ``rt/api/sport/response``,
state on ``rt/sportmodestate``, camera frames from the ``videohub`` service as JPEG.

Run it as ``speculative-vlm-sim-go2 --interface lo --domain-id 0``, or in-process with
:class:`SimulatedGo2` (one per process: the SDK's DDS participant is process-wide, and its
RPC servers cannot be torn down, so tests that stop or kill the robot run it as a
subprocess).
"""

from __future__ import annotations

import argparse
import itertools
import math
import signal
import sys
import threading
import time

from unitree_sdk2py.core.channel import ChannelPublisher
from unitree_sdk2py.go2.sport import sport_api as api
from unitree_sdk2py.go2.video import video_api
from unitree_sdk2py.idl.default import unitree_go_msg_dds__SportModeState_
from unitree_sdk2py.idl.unitree_go.msg.dds_ import SportModeState_
from unitree_sdk2py.rpc.internal import RPC_OK
from unitree_sdk2py.rpc.server import Server

from speculative_vlm.go2.dds import MAX_DOMAIN_ID, init_domain
from speculative_vlm.go2.render import CameraModel, encode_jpeg, render_bgr
from speculative_vlm.go2.scene import Scene, load_scene
from speculative_vlm.go2.sim_model import Go2Limits, Go2Model, Go2State, Mode

STATE_TOPIC = "rt/sportmodestate"
SPORT_API_IDS = (
    api.SPORT_API_ID_DAMP,
    api.SPORT_API_ID_BALANCESTAND,
    api.SPORT_API_ID_STOPMOVE,
    api.SPORT_API_ID_STANDUP,
    api.SPORT_API_ID_STANDDOWN,
    api.SPORT_API_ID_RECOVERYSTAND,
    api.SPORT_API_ID_EULER,
    api.SPORT_API_ID_MOVE,
    api.SPORT_API_ID_SIT,
    api.SPORT_API_ID_RISESIT,
    api.SPORT_API_ID_SPEEDLEVEL,
)
# Not a JPEG: what a truncated or garbled frame from the robot looks like to a decoder.
CORRUPT_FRAME = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4


class _SportServer(Server):
    def __init__(self, model: Go2Model) -> None:
        super().__init__(api.SPORT_SERVICE_NAME)
        self._model = model

    def Init(self) -> None:  # noqa: N802 (SDK naming)
        self._SetApiVersion(api.SPORT_API_VERSION)
        for api_id in SPORT_API_IDS:
            self._RegistHandler(api_id, self._handler(api_id), False)

    def _handler(self, api_id: int):
        def handle(parameter: str) -> tuple[int, str]:
            return self._model.handle(api_id, parameter), ""

        return handle


class _VideoServer(Server):
    def __init__(self, frame_source) -> None:
        super().__init__(video_api.VIDEO_SERVICE_NAME)
        # unitree_sdk2py 1.0.3 creates this registry as a dict and then calls .add() on it,
        # so binary handlers cannot be registered without making it a set first.
        self._Server__apiBinarySet = set()
        self._frame_source = frame_source

    def Init(self) -> None:  # noqa: N802 (SDK naming)
        self._SetApiVersion(video_api.VIDEO_API_VERSION)
        self._RegistBinaryHandler(video_api.VIDEO_API_ID_GETIMAGESAMPLE, self._get_image_sample, False)

    def _get_image_sample(self, _parameter: list) -> tuple[int, list]:
        return RPC_OK, list(self._frame_source())


class SimulatedGo2:
    """One simulated Go2 on the SDK's DDS participant of this process."""

    def __init__(
        self,
        domain_id: int = 0,
        interface: str = "lo",
        scene: Scene | None = None,
        camera: CameraModel | None = None,
        limits: Go2Limits | None = None,
        state_rate_hz: float = 50.0,
        corrupt_every: int = 0,
        start_mode: Mode = Mode.BALANCE_STAND,
    ) -> None:
        self.scene = scene or load_scene()
        self.camera = camera or CameraModel()
        self.model = Go2Model(limits, self.scene.start_x, self.scene.start_y, self.scene.start_yaw, start_mode)
        self._domain = (domain_id, interface)
        self._state_period = 1.0 / state_rate_hz
        self._corrupt_every = corrupt_every
        self._frames = itertools.count(1)
        self.frames_served = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._publisher: ChannelPublisher | None = None

    def start(self) -> SimulatedGo2:
        """Join the DDS domain, start the sport and video servers and the state stream."""
        init_domain(*self._domain)
        self._publisher = ChannelPublisher(STATE_TOPIC, SportModeState_)
        self._publisher.Init()
        sport = _SportServer(self.model)
        sport.Init()
        sport.Start(False)
        video = _VideoServer(self.frame_jpeg)
        video.Init()
        video.Start(False)
        self._thread = threading.Thread(target=self._run, name="go2_sim", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop moving and publishing state (the SDK's RPC servers live until the process ends)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._publisher is not None:
            self._publisher.Close()

    # ---- what other code may observe ------------------------------------------------
    def state(self) -> Go2State:
        return self.model.snapshot()

    def distance_to(self, name: str) -> float:
        s = self.model.snapshot()
        return self.scene.distance_to(name, s.x, s.y)

    def frame_jpeg(self) -> bytes:
        """The current camera view as JPEG (every ``corrupt_every``-th one deliberately broken)."""
        n = next(self._frames)
        self.frames_served += 1
        if self._corrupt_every and n % self._corrupt_every == 0:
            return CORRUPT_FRAME
        s = self.model.snapshot()
        return encode_jpeg(render_bgr(self.scene, s.x, s.y, s.yaw, self.camera))

    # ---- loop -----------------------------------------------------------------------
    def _run(self) -> None:
        physics_period = 0.01
        next_state = time.monotonic()
        next_step = time.monotonic()
        while not self._stop.is_set():
            self.model.step()
            now = time.monotonic()
            if now >= next_state:
                self._publish_state()
                next_state = max(next_state + self._state_period, now)
            next_step += physics_period
            self._stop.wait(max(0.0, next_step - time.monotonic()))

    def _publish_state(self) -> None:
        s = self.model.snapshot()
        msg = unitree_go_msg_dds__SportModeState_()
        now = time.time()
        msg.stamp.sec, msg.stamp.nanosec = int(now), int((now % 1.0) * 1e9)
        msg.mode = int(s.mode)
        msg.progress = 1.0
        msg.gait_type = 1 if s.mode == Mode.LOCOMOTION else 0
        msg.position = [s.x, s.y, self.model.body_height()]
        msg.body_height = self.model.body_height()
        c, si = math.cos(s.yaw), math.sin(s.yaw)
        # The Go2 reports velocity in the world (odometry) frame.
        msg.velocity = [s.vx * c - s.vy * si, s.vx * si + s.vy * c, 0.0]
        msg.yaw_speed = s.vyaw
        msg.imu_state.rpy = [0.0, 0.0, s.yaw]
        msg.imu_state.quaternion = [math.cos(s.yaw / 2), 0.0, 0.0, math.sin(s.yaw / 2)]  # w, x, y, z
        msg.imu_state.gyroscope = [0.0, 0.0, s.vyaw]
        msg.imu_state.accelerometer = [0.0, 0.0, 9.81]
        self._publisher.Write(msg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="speculative-vlm-sim-go2",
        description="Simulated Unitree Go2: answers unitree_sdk2py sport and video requests over DDS, "
        "integrates Move into a planar pose, publishes rt/sportmodestate and renders a camera view.",
    )
    p.add_argument("--domain-id", type=int, default=0, help=f"DDS domain id, 0..{MAX_DOMAIN_ID} (the Go2 uses 0)")
    p.add_argument("--interface", default="lo", help="network interface for DDS (default: lo)")
    p.add_argument("--scene", default=None, help="scene YAML path or packaged scene name (default: 'default')")
    p.add_argument("--width", type=int, default=640, help="camera image width, pixels")
    p.add_argument("--height", type=int, default=480, help="camera image height, pixels")
    p.add_argument("--hfov", type=float, default=90.0, help="camera horizontal field of view, degrees")
    p.add_argument("--state-rate", type=float, default=50.0, help="rt/sportmodestate rate, Hz")
    p.add_argument("--move-timeout", type=float, default=1.0, help="seconds without Move before the robot stops")
    p.add_argument("--corrupt-every", type=int, default=0, help="serve a broken JPEG every N-th frame (0: never)")
    p.add_argument(
        "--start-mode", choices=[m.name.lower() for m in Mode], default="balance_stand", help="initial sport mode"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.state_rate <= 500 or args.width < 16 or args.height < 16 or not 10 <= args.hfov <= 170:
        print("error: --state-rate must be in (0, 500], --width/--height >= 16, --hfov in [10, 170]", file=sys.stderr)
        return 2
    sim = SimulatedGo2(
        domain_id=args.domain_id,
        interface=args.interface,
        scene=load_scene(args.scene),
        camera=CameraModel(args.width, args.height, args.hfov),
        limits=Go2Limits(move_timeout=args.move_timeout),
        state_rate_hz=args.state_rate,
        corrupt_every=args.corrupt_every,
        start_mode=Mode[args.start_mode.upper()],
    ).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"ready: simulated Go2 on DDS domain {args.domain_id} via {args.interface}", flush=True)
    done.wait()
    sim.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
