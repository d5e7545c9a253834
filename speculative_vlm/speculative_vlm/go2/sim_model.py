"""The simulated Go2's behaviour: the sport-mode state machine and planar kinematics (no DDS).

The rules follow what the real Go2 does as far as it is publicly known:
- It powers up standing in balance stand (mode 1), where Move is obeyed.
- StandUp locks the joints standing (mode 6); Move is then ignored until BalanceStand
  (a common surprise, see unitree_sdk2_python issue #175 and webrtc_connect issue #17).
- Move is a no-reply request: the robot cannot refuse it, it simply ignores it when not
  in a walking state. It walks only while Move keeps coming; after ``move_timeout``
  seconds without one it stops by itself.
- Request-reply calls that make no sense in the current state (Sit while lying down,
  RiseSit when not sitting, ...) are refused. Unitree does not document a dedicated
  code for this; the sim answers ``RPC_ERR_SERVER_API_PARAMETER`` (3204), the SDK's
  server-side "request not acceptable" code, so clients see a non-zero code as on the
  robot.
Velocities follow commands under acceleration limits; StopMove decelerates, it does not
teleport to zero.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum

from unitree_sdk2py.go2.sport import sport_api as api
from unitree_sdk2py.rpc.internal import RPC_ERR_SERVER_API_PARAMETER, RPC_OK

REFUSED = RPC_ERR_SERVER_API_PARAMETER


class Mode(IntEnum):
    """``SportModeState_.mode`` values of the Go2."""

    IDLE = 0
    BALANCE_STAND = 1
    LOCOMOTION = 3
    LIE_DOWN = 5
    JOINT_LOCK = 6
    DAMPING = 7
    RECOVERY_STAND = 8
    SIT = 10


STANDING = (Mode.BALANCE_STAND, Mode.LOCOMOTION)
BODY_HEIGHT = {Mode.LIE_DOWN: 0.08, Mode.DAMPING: 0.08, Mode.SIT: 0.2}


@dataclass
class Go2Limits:
    """Physical limits of the simulated robot (roughly the Go2's normal speed level)."""

    max_vx: float = 1.5  # m/s; the Go2 tops out near 2.5-3.5 m/s in fast modes
    max_vy: float = 0.8
    max_vyaw: float = 2.5  # rad/s
    accel: float = 1.5  # m/s^2, linear
    yaw_accel: float = 4.0  # rad/s^2
    move_timeout: float = 1.0  # s without Move before the robot stops by itself


@dataclass
class Go2State:
    mode: Mode = Mode.BALANCE_STAND
    x: float = 0.0
    y: float = 0.0
    yaw: float = 0.0
    vx: float = 0.0  # body frame, actual
    vy: float = 0.0
    vyaw: float = 0.0
    cmd: tuple[float, float, float] = (0.0, 0.0, 0.0)  # body frame, commanded
    last_move: float = -math.inf  # monotonic time of the last Move
    counts: dict[int, int] = field(default_factory=dict)  # api id -> requests received
    ignored_moves: int = 0


def _approach(value: float, target: float, step: float) -> float:
    if value < target:
        return min(value + step, target)
    return max(value - step, target)


class Go2Model:
    """Thread-safe sport-mode state machine + kinematics of one simulated Go2."""

    def __init__(
        self,
        limits: Go2Limits | None = None,
        x: float = 0.0,
        y: float = 0.0,
        yaw: float = 0.0,
        mode: Mode = Mode.BALANCE_STAND,
        clock=time.monotonic,
    ) -> None:
        self.limits = limits or Go2Limits()
        self._clock = clock
        self._lock = threading.Lock()
        self._state = Go2State(mode=mode, x=x, y=y, yaw=yaw)
        self._last_step = clock()

    # ---- requests -------------------------------------------------------------------
    def handle(self, api_id: int, parameter: str) -> int:
        """Apply one sport request; returns the code the robot answers with."""
        with self._lock:
            s = self._state
            s.counts[api_id] = s.counts.get(api_id, 0) + 1
            mode = s.mode
            if api_id == api.SPORT_API_ID_MOVE:
                return self._move(parameter)
            if api_id == api.SPORT_API_ID_DAMP:
                self._halt(Mode.DAMPING)
            elif api_id == api.SPORT_API_ID_STOPMOVE:
                s.cmd = (0.0, 0.0, 0.0)
                s.last_move = -math.inf
                if mode == Mode.LOCOMOTION:
                    s.mode = Mode.BALANCE_STAND
            elif api_id == api.SPORT_API_ID_STANDUP:
                if mode == Mode.SIT:
                    return REFUSED
                self._halt(Mode.JOINT_LOCK)
            elif api_id == api.SPORT_API_ID_STANDDOWN:
                if mode in (Mode.SIT, Mode.DAMPING):
                    return REFUSED
                self._halt(Mode.LIE_DOWN)
            elif api_id == api.SPORT_API_ID_BALANCESTAND:
                if mode in (Mode.SIT, Mode.DAMPING):
                    return REFUSED
                if mode != Mode.LOCOMOTION:
                    self._halt(Mode.BALANCE_STAND)
            elif api_id == api.SPORT_API_ID_RECOVERYSTAND:
                if mode == Mode.SIT:
                    return REFUSED
                self._halt(Mode.BALANCE_STAND)
            elif api_id == api.SPORT_API_ID_SIT:
                if mode not in STANDING:
                    return REFUSED
                self._halt(Mode.SIT)
            elif api_id == api.SPORT_API_ID_RISESIT:
                if mode != Mode.SIT:
                    return REFUSED
                self._halt(Mode.BALANCE_STAND)
            elif api_id in (api.SPORT_API_ID_EULER, api.SPORT_API_ID_SPEEDLEVEL):
                if mode not in STANDING:
                    return REFUSED
            else:
                return REFUSED
            return RPC_OK

    def _halt(self, mode: Mode) -> None:
        s = self._state
        s.mode, s.cmd, s.last_move = mode, (0.0, 0.0, 0.0), -math.inf
        s.vx = s.vy = s.vyaw = 0.0

    def _move(self, parameter: str) -> int:
        s = self._state
        try:
            p = json.loads(parameter)
            cmd = (float(p["x"]), float(p["y"]), float(p["z"]))
        except (ValueError, KeyError, TypeError):
            return REFUSED
        if s.mode not in STANDING or not all(math.isfinite(c) for c in cmd):
            s.ignored_moves += 1
            return REFUSED
        lim = self.limits
        s.cmd = (
            max(-lim.max_vx, min(lim.max_vx, cmd[0])),
            max(-lim.max_vy, min(lim.max_vy, cmd[1])),
            max(-lim.max_vyaw, min(lim.max_vyaw, cmd[2])),
        )
        s.last_move = self._clock()
        s.mode = Mode.LOCOMOTION
        return RPC_OK

    # ---- time -----------------------------------------------------------------------
    def step(self) -> None:
        """Advance the kinematics to now (call at 100 Hz or so)."""
        now = self._clock()
        with self._lock:
            dt = max(0.0, min(now - self._last_step, 0.1))
            self._last_step = now
            s, lim = self._state, self.limits
            if now - s.last_move > lim.move_timeout:
                s.cmd = (0.0, 0.0, 0.0)
            s.vx = _approach(s.vx, s.cmd[0], lim.accel * dt)
            s.vy = _approach(s.vy, s.cmd[1], lim.accel * dt)
            s.vyaw = _approach(s.vyaw, s.cmd[2], lim.yaw_accel * dt)
            c, si = math.cos(s.yaw), math.sin(s.yaw)
            s.x += (s.vx * c - s.vy * si) * dt
            s.y += (s.vx * si + s.vy * c) * dt
            s.yaw = math.atan2(math.sin(s.yaw + s.vyaw * dt), math.cos(s.yaw + s.vyaw * dt))
            if s.mode == Mode.LOCOMOTION and s.cmd == (0.0, 0.0, 0.0) and s.vx == s.vy == s.vyaw == 0.0:
                s.mode = Mode.BALANCE_STAND

    def snapshot(self) -> Go2State:
        """A copy of the current state."""
        with self._lock:
            s = self._state
            return Go2State(s.mode, s.x, s.y, s.yaw, s.vx, s.vy, s.vyaw, s.cmd, s.last_move, dict(s.counts), s.ignored_moves)

    def body_height(self) -> float:
        with self._lock:
            return BODY_HEIGHT.get(self._state.mode, 0.32)
