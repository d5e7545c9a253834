"""The robot backend of the motion and camera nodes: unitree_sdk2py's real clients.

:class:`SportBackend` wraps ``SportClient`` (sport requests) and a subscription to
``rt/sportmodestate``; :class:`VideoBackend` wraps ``VideoClient``. Both go through the
process-wide DDS domain of :mod:`speculative_vlm.go2.dds`, so they work unchanged against
the real Go2 (``eth0``-like interface, domain 0) and the simulated one (``lo``).
Every call returns the SDK's code (0 = OK; 3102 send error, 3104 timeout, ...).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from unitree_sdk2py.core.channel import ChannelSubscriber
from unitree_sdk2py.go2.sport.sport_client import SportClient
from unitree_sdk2py.go2.video.video_client import VideoClient
from unitree_sdk2py.idl.unitree_go.msg.dds_ import SportModeState_

from speculative_vlm.go2.dds import init_domain

STATE_TOPIC = "rt/sportmodestate"

# Names of the SDK's return codes, for diagnostics.
CODE_NAMES = {
    0: "OK",
    3001: "unknown error",
    3102: "send error (no robot listening?)",
    3103: "API not registered",
    3104: "timeout (robot did not answer)",
    3105: "API mismatch",
    3106: "bad reply data",
    3201: "server send error",
    3202: "server internal error",
    3203: "API not implemented by the robot",
    3204: "request refused in the robot's current state",
    3205: "lease denied",
    4201: "sport server overtime",
    4202: "sport server not initialised",
}


def code_name(code: int) -> str:
    return CODE_NAMES.get(code, "unknown code")


@dataclass(frozen=True)
class RobotState:
    """What the motion node needs from one ``SportModeState_`` sample (odometry frame)."""

    x: float
    y: float
    z: float
    yaw: float
    quaternion_wxyz: tuple[float, float, float, float]
    vx_world: float
    vy_world: float
    yaw_rate: float
    mode: int
    received: float  # time.monotonic() when it arrived

    @property
    def vx_body(self) -> float:
        return self.vx_world * math.cos(self.yaw) + self.vy_world * math.sin(self.yaw)

    @property
    def vy_body(self) -> float:
        return -self.vx_world * math.sin(self.yaw) + self.vy_world * math.cos(self.yaw)


def _state_from_sample(m: SportModeState_) -> RobotState:
    q = tuple(float(v) for v in m.imu_state.quaternion)
    return RobotState(
        x=float(m.position[0]),
        y=float(m.position[1]),
        z=float(m.position[2]),
        yaw=float(m.imu_state.rpy[2]),
        quaternion_wxyz=q if any(q) else (1.0, 0.0, 0.0, 0.0),
        vx_world=float(m.velocity[0]),
        vy_world=float(m.velocity[1]),
        yaw_rate=float(m.yaw_speed),
        mode=int(m.mode),
        received=time.monotonic(),
    )


class SportBackend:
    """Sport requests and state of one Go2 through unitree_sdk2py.

    ``timeout_s`` bounds every request: how long a reply is awaited, and how long a send
    waits for a robot to be listening before failing with 3102.
    """

    def __init__(self, domain_id: int, interface: str, timeout_s: float = 0.5, on_state=None) -> None:
        init_domain(domain_id, interface)
        self._lock = threading.Lock()
        self._state: RobotState | None = None
        self._on_state = on_state
        self.states_received = 0
        self._client = SportClient()
        self._client.SetTimeout(timeout_s)
        self._client.Init()
        self._sub = ChannelSubscriber(STATE_TOPIC, SportModeState_)
        # queueLen > 0: samples are handled on the SDK's reader thread, not inside the DDS listener.
        self._sub.Init(self._handle_state, 10)

    def _handle_state(self, sample: SportModeState_) -> None:
        state = _state_from_sample(sample)
        with self._lock:
            self._state = state
            self.states_received += 1
        if self._on_state is not None:
            self._on_state(state)

    def latest_state(self) -> RobotState | None:
        with self._lock:
            return self._state

    def move(self, vx: float, vy: float, vyaw: float) -> int:
        return self._client.Move(float(vx), float(vy), float(vyaw))

    def stop_move(self) -> int:
        return self._client.StopMove()

    def stand_up(self) -> int:
        return self._client.StandUp()

    def stand_down(self) -> int:
        return self._client.StandDown()

    def balance_stand(self) -> int:
        return self._client.BalanceStand()

    def sit(self) -> int:
        return self._client.Sit()

    def rise_sit(self) -> int:
        return self._client.RiseSit()

    def close(self) -> None:
        self._on_state = None
        self._sub.Close()


class VideoBackend:
    """JPEG frames from the Go2's ``videohub`` service through ``VideoClient``."""

    def __init__(self, domain_id: int, interface: str, timeout_s: float = 1.0) -> None:
        init_domain(domain_id, interface)
        self._client = VideoClient()
        self._client.SetTimeout(timeout_s)
        self._client.Init()

    def get_jpeg(self) -> tuple[int, bytes]:
        """(code, JPEG bytes); bytes are empty when code is not 0."""
        code, data = self._client.GetImageSample()
        if code != 0 or data is None:
            return code, b""
        return code, bytes(data)
