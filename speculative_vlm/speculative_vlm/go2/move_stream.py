"""The Move stream: the motion node's safety rules as a plain class, with an injected clock and backend.

The Go2 walks only while Move is re-sent at 20-30 Hz (it stops 1-2 s after the last one) and clamps
nothing itself, so the limits and the stopping are ours. :class:`MoveStream` decides, for every input
and every tick, what goes to the robot:

- every velocity is clamped to :class:`~speculative_vlm.go2.motion_rules.MotionLimits`, every
  duration to ``max_duration_s``;
- Move is re-sent every ``1 / move_rate_hz`` while a velocity is active, and a new motion gets its
  first Move at once rather than at the next tick;
- StopMove goes out when a command's duration ends, when cmd_vel goes stale (``stale_timeout_s``), on
  e-stop, on cancel and on :meth:`MoveStream.halt` (deactivate, shutdown);
- with ``require_verified`` only commands the target verified may move the robot (STOP and DONE
  are always accepted);
- the e-stop latches: :meth:`MoveStream.engage_estop` drops everything and sends StopMove, and until
  :meth:`MoveStream.release_estop` nothing but StopMove reaches the robot.

Each command runs as an :class:`Execution` that ends with one :class:`Outcome` and a reason (the
motion node's ``motion/execute`` action returns them); a newer command, from a goal, a topic or
cmd_vel, preempts it. The class imports no ROS.

How it is driven: the motion node calls :meth:`MoveStream.execute`, :meth:`MoveStream.cmd_vel`,
:meth:`MoveStream.engage_estop` and the rest from its callbacks, and runs :meth:`MoveStream.run` on a
thread of its own on the steady clock, so executor load cannot starve the stream and an input wakes
it at once (the e-stop's StopMove goes out within milliseconds). Tests call :meth:`MoveStream.tick`
with a fake clock and a recording backend instead, and see every rule deterministically.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from speculative_vlm.commands.schema import Action, LocomotionCommand
from speculative_vlm.go2.motion_rules import SPORT_REQUESTS, MotionLimits


class SportRequests(Protocol):
    """The sport requests the stream sends (``go2.sdk_backend.SportBackend``); each returns the SDK's code."""

    def move(self, vx: float, vy: float, vyaw: float) -> int: ...
    def stop_move(self) -> int: ...
    def stand_up(self) -> int: ...
    def stand_down(self) -> int: ...
    def balance_stand(self) -> int: ...
    def sit(self) -> int: ...
    def rise_sit(self) -> int: ...


# The backend method of each sport request that motion_rules.SPORT_REQUESTS names.
REQUEST_METHODS = {
    "StopMove": "stop_move",
    "StandUp": "stand_up",
    "StandDown": "stand_down",
    "BalanceStand": "balance_stand",
    "Sit": "sit",
    "RiseSit": "rise_sit",
}


class Outcome(IntEnum):
    """How an execution ended; the values are ``ExecuteCommand.Result``'s constants."""

    COMPLETED = 0  # ran to its end (a MOVE its duration, then StopMove; STOP or a posture sent; DONE)
    CANCELED = 1  # the client cancelled it; StopMove
    PREEMPTED = 2  # a newer command replaced it
    ESTOPPED = 3  # the e-stop was engaged; StopMove
    STOPPED = 4  # the stream was halted (deactivate, shutdown); StopMove
    REJECTED = 5  # never executed; the reason says why
    FAILED = 6  # sent, but the robot refused or did not answer a request


def needs_verification(command: LocomotionCommand) -> bool:
    """Whether ``require_verified`` applies: stopping (STOP) and doing nothing (DONE) are always safe."""
    return command.action not in (Action.STOP, Action.DONE)


class Execution:
    """One command from its acceptance to its end. ``done`` is set once ``outcome`` and ``reason`` are."""

    def __init__(self, command: LocomotionCommand | None, started: float, end: float | None = None) -> None:
        self.command = command  # as executed: clamped; None when it was refused before it had one
        self.started = started  # on the stream's clock
        self.end = end  # a MOVE's deadline on the stream's clock
        self.outcome: Outcome | None = None
        self.reason = ""
        self.finished: float | None = None
        self.done = threading.Event()

    def _finish(self, outcome: Outcome, reason: str, now: float) -> None:
        self.outcome, self.reason, self.finished = outcome, reason, now
        self.done.set()

    @property
    def elapsed_s(self) -> float:
        """Seconds from acceptance to the end (0 before it has ended)."""
        return 0.0 if self.finished is None else self.finished - self.started


@dataclass(frozen=True)
class Progress:
    """Where an execution stands: time since acceptance, a MOVE's time left, the velocity streamed now."""

    elapsed_s: float
    remaining_s: float
    vx: float = 0.0
    vy: float = 0.0
    vyaw: float = 0.0


@dataclass(frozen=True)
class StreamStatus:
    """What the stream has done, for diagnostics."""

    estop_engaged: bool
    moving: bool
    last_input: float | None  # stream clock time of the last accepted command or cmd_vel
    moves_last_second: int
    refused_while_estop: int
    unverified_refused: int
    last_codes: dict[str, int]
    error_counts: dict[str, int]


@dataclass
class _Velocity:
    """A velocity being streamed as Move."""

    vx: float
    vy: float
    vyaw: float
    end: float | None  # deadline (a MOVE) or None (cmd_vel: ends when stale)
    last_input: float  # time of the input that set it


class MoveStream:
    """The motion node's safety core: clamps, the Move schedule, stale stop, e-stop, executions.

    ``clock`` is a monotonic clock in seconds (``time.monotonic`` on a robot). ``limits``,
    ``move_rate_hz``, ``stale_timeout_s`` and ``require_verified`` are plain attributes, read at
    each command or tick, so a parameter changed at run time applies at once. ``on_idle(idle)`` is
    called whenever the stream turns idle (nothing to send) or busy; ``on_request_error(name, code,
    error)`` whenever a sport request returns non-zero or raises (``code`` -1, ``error`` the
    exception). ``describe_code`` names an SDK code in reasons.
    """

    def __init__(
        self,
        backend: SportRequests,
        clock: Callable[[], float] = time.monotonic,
        *,
        limits: MotionLimits | None = None,
        move_rate_hz: float = 25.0,
        stale_timeout_s: float = 0.5,
        require_verified: bool = True,
        on_idle: Callable[[bool], None] | None = None,
        on_request_error: Callable[[str, int, Exception | None], None] | None = None,
        describe_code: Callable[[int], str] = lambda code: f"code {code}",
    ) -> None:
        self.limits = limits or MotionLimits()
        self.move_rate_hz = move_rate_hz
        self.stale_timeout_s = stale_timeout_s
        self.require_verified = require_verified
        self._backend = backend
        self._clock = clock
        self._on_idle = on_idle or (lambda idle: None)
        self._on_request_error = on_request_error or (lambda name, code, error: None)
        self._describe = describe_code
        self._lock = threading.Lock()  # the state below
        self._send_lock = threading.Lock()  # one sender at a time, so requests reach the robot in order
        self._idle_lock = threading.Lock()  # idle changes are reported in the order they happen
        self._wake = threading.Event()
        self._active = False
        self._estop = False
        self._velocity: _Velocity | None = None
        self._requests: deque[str] = deque()
        self._stop_pending = False
        self._sending = False  # requests taken by a tick and not yet sent: not idle yet
        self._restart_ticks = False
        self._next_tick = 0.0
        self._current: Execution | None = None
        self._idle: bool | None = None
        self._last_input: float | None = None
        self._refused_while_estop = 0
        self._unverified_refused = 0
        self._last_codes: dict[str, int] = {}
        self._error_counts: dict[str, int] = {}
        self._move_times: deque[float] = deque(maxlen=200)

    # ---- state ----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    @property
    def estop_engaged(self) -> bool:
        return self._estop

    @property
    def unverified_refused(self) -> int:
        """Commands refused because the target had not verified them."""
        return self._unverified_refused

    @property
    def current(self) -> Execution | None:
        """The execution in progress, if any."""
        return self._current

    def status(self) -> StreamStatus:
        now = self._clock()
        with self._lock:
            return StreamStatus(
                estop_engaged=self._estop, moving=self._velocity is not None, last_input=self._last_input,
                moves_last_second=sum(1 for t in self._move_times if now - t <= 1.0),
                refused_while_estop=self._refused_while_estop, unverified_refused=self._unverified_refused,
                last_codes=dict(self._last_codes), error_counts=dict(self._error_counts),
            )

    def progress(self, execution: Execution) -> Progress:
        """Where ``execution`` stands now (the velocity is the one streamed for it, 0 once it ended)."""
        now = self._clock()
        with self._lock:
            running = execution.outcome is None
            elapsed = (now if running else execution.finished) - execution.started
            remaining = max(0.0, execution.end - now) if running and execution.end is not None else 0.0
            v = self._velocity if running and execution is self._current else None
        if v is None:
            return Progress(elapsed, remaining)
        return Progress(elapsed, remaining, v.vx, v.vy, v.vyaw)

    # ---- lifecycle ------------------------------------------------------------------
    def activate(self) -> None:
        """Accept commands and stream from now on."""
        with self._lock:
            self._active = True
            self._next_tick = self._clock()
        self._update_idle()

    def halt(self, reason: str = "the motion node stopped") -> None:
        """Stop streaming and send StopMove now, in the caller's thread; commands are refused until
        :meth:`activate`. Safe to call any time, repeatedly."""
        with self._send_lock:
            with self._lock:
                self._active = False
                self._velocity = None
                self._requests.clear()
                self._stop_pending = False
                self._end_current(Outcome.STOPPED, f"{reason}; StopMove sent", self._clock())
            self._send("StopMove", self._backend.stop_move)
        self._update_idle()

    def wake(self) -> None:
        """Make :meth:`run` tick now (an input changed what is due)."""
        self._wake.set()

    # ---- inputs ---------------------------------------------------------------------
    def execute(self, command: LocomotionCommand, verified: bool, source: str = "a newer command") -> Execution:
        """Start executing ``command`` (preempting the running one), or refuse it: the returned
        execution ends REJECTED at once with the reason. ``source`` names the input in the reason
        given to the execution it preempts."""
        now = self._clock()
        with self._lock:
            refusal = self._refusal(command, verified)
            if refusal:
                execution = Execution(None, now)
                execution._finish(Outcome.REJECTED, refusal, now)
                return execution
            self._last_input = now
            self._end_current(Outcome.PREEMPTED, f"replaced by {source}", now)
            was_moving = self._velocity is not None
            self._velocity = None
            self._requests.clear()
            execution = self._start(command, was_moving, now)
        self._update_idle()
        self._wake.set()
        return execution

    def refuse(self, reason: str) -> Execution:
        """An execution refused before it started (e.g. a message whose action is no action)."""
        now = self._clock()
        execution = Execution(None, now)
        execution._finish(Outcome.REJECTED, reason, now)
        return execution

    def cmd_vel(self, vx: float, vy: float, vyaw: float) -> str:
        """Stream a velocity until the next input, or until it is older than ``stale_timeout_s``.
        Returns '' when accepted, else why it was refused."""
        now = self._clock()
        with self._lock:
            refusal = self._refusal(None, True)
            if refusal:
                return refusal
            self._last_input = now
            self._end_current(Outcome.PREEMPTED, "replaced by cmd_vel", now)
            vx, vy, vyaw = self.limits.clamp_velocity(vx, vy, vyaw)
            self._requests.clear()
            if self._velocity is None:
                self._restart_ticks = True
            self._velocity = _Velocity(vx, vy, vyaw, None, now)
        self._update_idle()
        self._wake.set()
        return ""

    def cancel(self, execution: Execution, reason: str = "cancelled by the client") -> bool:
        """End ``execution`` CANCELED and stop the robot, if it is still the one running."""
        with self._lock:
            if execution is not self._current or execution.outcome is not None:
                return False
            self._velocity = None
            self._requests.clear()
            self._stop_pending = True
            self._end_current(Outcome.CANCELED, f"{reason}; StopMove sent", self._clock())
        self._wake.set()
        return True

    def engage_estop(self, source: str) -> bool:
        """Latch the e-stop: drop everything, StopMove at the next tick (at once under :meth:`run`),
        refuse commands until released. True when it was not engaged before."""
        with self._lock:
            was = self._estop
            self._estop = True
            self._velocity = None
            self._requests.clear()
            self._stop_pending = True
            self._end_current(Outcome.ESTOPPED, f"e-stop engaged by {source}; StopMove sent", self._clock())
        self._wake.set()
        return not was

    def release_estop(self) -> bool:
        """Release the e-stop (only ever explicit); True when it was engaged."""
        with self._lock:
            was, self._estop = self._estop, False
        return was

    # ---- the stream -----------------------------------------------------------------
    def tick(self) -> float:
        """Send what is due now: a pending StopMove, posture requests, and Move when its period has come.

        Returns the seconds until the next Move is due (the longest :meth:`run` waits)."""
        with self._send_lock:
            now = self._clock()
            with self._lock:
                period = 1.0 / self.move_rate_hz
                if not self._active:
                    return period
                stop, self._stop_pending = self._stop_pending, False
                requests = list(self._requests)
                self._requests.clear()
                if self._restart_ticks:
                    self._restart_ticks = False
                    self._next_tick = now
                v = self._velocity
                if v is not None and (
                    (v.end is not None and now >= v.end)
                    or (v.end is None and now - v.last_input > self.stale_timeout_s)
                ):
                    self._velocity, v, stop = None, None, True
                execution = self._current
                # The running execution ends with these sends when nothing of it remains to stream.
                settles = execution is not None and self._velocity is None and bool(stop or requests)
                move_due = now >= self._next_tick
                if move_due:
                    self._next_tick += period
                    # A late tick (busy CPU) is caught up on the next one, keeping the average rate;
                    # after a long stall (a blocked send) the schedule restarts from this Move
                    # instead of bursting a backlog of Moves at the robot.
                    if self._next_tick < now - period:
                        self._next_tick = now + period
                self._sending = bool(stop or requests)
            codes: dict[str, int] = {}
            if stop:
                codes["StopMove"] = self._send("StopMove", self._backend.stop_move)
            for name in requests:
                codes[name] = self._send(name, getattr(self._backend, REQUEST_METHODS[name]))
            if move_due and v is not None and not self._estop:
                self._send("Move", lambda: self._backend.move(v.vx, v.vy, v.vyaw))
                with self._lock:
                    self._move_times.append(self._clock())
            with self._lock:
                self._sending = False
                if settles and self._current is execution:
                    failed = [f"{n} -> {c} ({self._describe(c)})" for n, c in codes.items() if c != 0]
                    if failed:
                        self._end_current(Outcome.FAILED, "the robot did not do it: " + "; ".join(failed), now)
                    else:
                        self._end_current(Outcome.COMPLETED, _completed(execution.command, codes), now)
                next_tick = self._next_tick
        if stop or requests:
            self._update_idle()
        return max(0.0, next_tick - self._clock())

    def run(self, stopping: threading.Event) -> None:
        """Tick until ``stopping`` is set (then call :meth:`wake`): the motion node's Move thread.

        Waits on the real clock between ticks and wakes at once on any input."""
        delay = 0.0
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if stopping.is_set():
                return
            delay = self.tick()

    # ---- internals ------------------------------------------------------------------
    def _refusal(self, command: LocomotionCommand | None, verified: bool) -> str:
        """Why an input is refused now ('' when it is accepted). Holds the lock."""
        if not self._active:
            return "the motion node is not active"
        if self._estop:
            self._refused_while_estop += 1
            return "e-stop engaged; call motion/release_estop first"
        if command is not None and not verified and needs_verification(command) and self.require_verified:
            self._unverified_refused += 1
            return "unverified command refused; set require_verified:=false to allow"
        return ""

    def _start(self, command: LocomotionCommand, was_moving: bool, now: float) -> Execution:
        """The execution of an accepted command, its sends scheduled. Holds the lock."""
        action = command.action
        if action == Action.MOVE:
            vx, vy, vyaw = self.limits.clamp_velocity(command.vx, command.vy, command.vyaw)
            duration = self.limits.clamp_duration(command.duration)
            execution = Execution(LocomotionCommand(action, vx, vy, vyaw, duration), now, now + duration)
            if duration > 0.0:
                self._velocity = _Velocity(vx, vy, vyaw, now + duration, now)
                self._restart_ticks = True
            else:
                self._stop_pending = True
        else:
            execution = Execution(LocomotionCommand(action), now)
            if action == Action.STOP:
                self._stop_pending = True
            elif action == Action.DONE:
                # Nothing to send, but a motion it interrupts ends with StopMove, not by the Move
                # stream falling silent (the robot would walk on for 1-2 s).
                self._stop_pending = self._stop_pending or was_moving
                execution._finish(Outcome.COMPLETED, "done: nothing is sent to the robot", now)
                return execution
            else:
                self._requests.extend(SPORT_REQUESTS[action.value])
        self._current = execution
        return execution

    def _end_current(self, outcome: Outcome, reason: str, now: float) -> None:
        """End the running execution, if any. Holds the lock."""
        if self._current is not None:
            self._current._finish(outcome, reason, now)
            self._current = None

    def _send(self, name: str, request: Callable[[], int]) -> int:
        try:
            code, error = int(request()), None
        except Exception as exc:  # the SDK raises bare exceptions on DDS errors; keep streaming
            code, error = -1, exc
        with self._lock:
            self._last_codes[name] = code
            if code != 0:
                self._error_counts[name] = self._error_counts.get(name, 0) + 1
        if code != 0:
            self._on_request_error(name, code, error)
        return code

    def _update_idle(self) -> None:
        with self._idle_lock:
            with self._lock:
                idle = (self._velocity is None and not self._requests and not self._stop_pending
                        and not self._sending)
            if idle != self._idle:
                self._idle = idle
                self._on_idle(idle)


def _completed(command: LocomotionCommand | None, codes: dict[str, int]) -> str:
    if command is not None and command.action == Action.MOVE and command.duration > 0.0:
        return f"moved for {command.duration:g} s, then StopMove"
    return " and ".join(codes) + " sent" if codes else "nothing to send"
