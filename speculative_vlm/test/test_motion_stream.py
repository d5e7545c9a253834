"""The motion node's safety core (go2/move_stream.py) on a fake clock: every rule, deterministically.

A recording backend stands in for the Go2's SportClient (it is our own backend interface, the one
``go2.sdk_backend.SportBackend`` implements) and notes each request with the fake clock's time;
``drive`` plays the Move thread, ticking exactly when the stream asks to. Rates are powers of two
(16 Hz: a 0.0625 s period) so that tick times are exact in binary floating point. The same rules
over real DDS against the simulated Go2 are in test_motion_node.py.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
from speculative_vlm.commands.schema import Action, LocomotionCommand
from speculative_vlm.go2.motion_rules import MotionLimits
from speculative_vlm.go2.move_stream import MoveStream, Outcome

RATE = 16.0
PERIOD = 1.0 / RATE
STALE = 0.5
LIMITS = MotionLimits(max_vx=0.6, min_vx=-0.3, max_vy=0.3, max_vyaw=0.8, max_duration_s=2.0)


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class RecordingBackend:
    """Notes every sport request as (time, name, args); answers each with ``codes`` (default 0)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, str, tuple]] = []
        self.codes: dict[str, int] = {}
        self.raises: dict[str, Exception] = {}

    def _request(self, name: str, *args) -> int:
        self.sent.append((self.clock(), name, args))
        if name in self.raises:
            raise self.raises[name]
        return self.codes.get(name, 0)

    def move(self, vx, vy, vyaw):
        return self._request("Move", vx, vy, vyaw)

    def stop_move(self):
        return self._request("StopMove")

    def stand_up(self):
        return self._request("StandUp")

    def stand_down(self):
        return self._request("StandDown")

    def balance_stand(self):
        return self._request("BalanceStand")

    def sit(self):
        return self._request("Sit")

    def rise_sit(self):
        return self._request("RiseSit")

    def times(self, name: str) -> list[float]:
        return [t for t, n, _ in self.sent if n == name]

    def names(self) -> list[str]:
        return [n for _, n, _ in self.sent]


class Rig:
    def __init__(self, **settings) -> None:
        self.clock = FakeClock(100.0)
        self.backend = RecordingBackend(self.clock)
        self.idle: list[tuple[float, bool]] = []
        self.errors: list[tuple[str, int]] = []
        self.stream = MoveStream(
            self.backend, self.clock, limits=LIMITS, move_rate_hz=RATE, stale_timeout_s=STALE,
            on_idle=lambda idle: self.idle.append((self.clock(), idle)),
            on_request_error=lambda name, code, error: self.errors.append((name, code)), **settings,
        )
        self.stream.activate()

    def drive(self, seconds: float) -> None:
        """Tick as the Move thread would, for ``seconds`` of fake time (a tick at the end too)."""
        end = self.clock.t + seconds
        while True:
            delay = self.stream.tick()
            if self.clock.t + delay > end:
                self.clock.t = end
                self.stream.tick()
                return
            self.clock.advance(delay)

    def move(self, vx: float, duration: float, vy: float = 0.0, vyaw: float = 0.0, verified: bool = True):
        return self.stream.execute(LocomotionCommand(Action.MOVE, vx, vy, vyaw, duration), verified)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_a_move_streams_move_at_the_rate_for_its_duration_then_stop_move(rig):
    t0 = rig.clock.t
    execution = rig.move(0.5, 1.0)
    rig.drive(1.5)
    moves = rig.backend.times("Move")
    assert moves == [t0 + i * PERIOD for i in range(16)]  # from the command on, every period, for 1 s
    assert rig.backend.times("StopMove") == [t0 + 1.0]  # exactly when the duration ends
    assert {args for _, n, args in rig.backend.sent if n == "Move"} == {(0.5, 0.0, 0.0)}
    assert execution.outcome == Outcome.COMPLETED and execution.elapsed_s == 1.0
    assert "moved for 1 s" in execution.reason


def test_velocities_and_the_duration_are_clamped_before_they_reach_the_robot(rig):
    execution = rig.move(5.0, 9.0, vy=-3.0, vyaw=math.inf)
    rig.drive(3.0)
    assert {args for _, n, args in rig.backend.sent if n == "Move"} == {(0.6, -0.3, 0.0)}
    assert rig.backend.times("StopMove") == [100.0 + 2.0]
    assert execution.command == LocomotionCommand(Action.MOVE, 0.6, -0.3, 0.0, 2.0)


def test_a_new_motion_gets_its_first_move_at_once_not_at_the_next_tick(rig):
    rig.drive(0.03)  # idle, mid-period
    rig.move(0.3, 0.5)
    rig.stream.tick()
    assert rig.backend.times("Move") == [100.03]


def test_a_late_tick_is_caught_up_and_a_long_stall_restarts_the_schedule(rig):
    rig.move(0.3, 2.0)
    rig.stream.tick()  # Move at 100.0; the next is due at 100.0625
    rig.clock.t = 100.1  # late by less than a period: the one after stays on 100.125
    rig.stream.tick()
    assert rig.stream.tick() == pytest.approx(0.025)
    rig.clock.t = 100.5  # a stall of several periods: one Move now, then every period from now
    rig.stream.tick()
    assert rig.stream.tick() == pytest.approx(PERIOD)
    assert rig.backend.times("Move") == [100.0, 100.1, 100.5]


def test_cmd_vel_streams_while_fresh_and_stops_once_stale(rig):
    last = rig.clock.t
    for _ in range(4):  # cmd_vel at 10 Hz for 0.4 s
        last = rig.clock.t
        assert rig.stream.cmd_vel(0.3, 0.0, 0.0) == ""
        rig.drive(0.1)
    rig.drive(1.0)
    [t_stop] = rig.backend.times("StopMove")
    assert last + STALE < t_stop <= last + STALE + PERIOD  # the first tick past the stale timeout
    assert max(rig.backend.times("Move")) < t_stop


def test_cmd_vel_is_clamped(rig):
    rig.stream.cmd_vel(-4.0, 0.0, -7.0)
    rig.stream.tick()
    assert rig.backend.sent[0][1:] == ("Move", (-0.3, 0.0, -0.8))


def test_the_estop_ends_the_running_command_and_stop_move_goes_out_at_the_next_tick(rig):
    execution = rig.move(0.5, 2.0)
    rig.drive(0.2)
    t_estop = rig.clock.t + 0.01
    rig.clock.t = t_estop
    assert rig.stream.engage_estop("a test") is True
    assert execution.outcome == Outcome.ESTOPPED and "e-stop engaged by a test" in execution.reason
    rig.stream.tick()
    assert rig.backend.times("StopMove") == [t_estop]
    rig.drive(1.0)
    assert max(rig.backend.times("Move")) < t_estop


def test_the_estop_latches_until_released(rig):
    rig.stream.engage_estop("a test")
    assert rig.stream.engage_estop("the same e-stop again") is False
    refused = rig.move(0.4, 1.0)
    assert refused.outcome == Outcome.REJECTED and "release_estop" in refused.reason
    assert "e-stop" in rig.stream.cmd_vel(0.4, 0.0, 0.0)
    rig.drive(0.5)
    assert "Move" not in rig.backend.names()
    assert rig.stream.status().refused_while_estop == 2
    assert rig.stream.release_estop() is True
    rig.move(0.4, 0.5)
    rig.drive(0.1)
    assert "Move" in rig.backend.names()


def test_the_estop_under_the_move_thread_sends_stop_move_within_milliseconds():
    # Real clock and the real run loop: the e-stop wakes the thread instead of waiting for a tick.
    backend = RecordingBackend(time.monotonic)
    stream = MoveStream(backend, time.monotonic, move_rate_hz=5.0)  # a 200 ms period: a tick would be late
    stream.activate()
    stopping = threading.Event()
    thread = threading.Thread(target=stream.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        stream.execute(LocomotionCommand(Action.MOVE, 0.3, 0.0, 0.0, 5.0), verified=True)
        deadline = time.monotonic() + 2.0
        while "Move" not in backend.names():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(0.05)
        t_estop = time.monotonic()
        stream.engage_estop("a test")
        while not backend.times("StopMove"):
            assert time.monotonic() < t_estop + 1.0, "no StopMove"
            time.sleep(0.0005)
    finally:
        stopping.set()
        stream.wake()
        thread.join(2.0)
    latency = backend.times("StopMove")[0] - t_estop
    print(f"\ne-stop -> StopMove through the Move thread: {1000 * latency:.2f} ms")
    assert latency < 0.05


def test_an_unverified_command_that_moves_is_refused_but_stop_and_done_are_obeyed(rig):
    refused = rig.move(0.4, 1.0, verified=False)
    assert refused.outcome == Outcome.REJECTED and "require_verified" in refused.reason
    assert rig.stream.unverified_refused == 1
    stop = rig.stream.execute(LocomotionCommand(Action.STOP), verified=False)
    rig.drive(0.1)
    done = rig.stream.execute(LocomotionCommand(Action.DONE), verified=False)
    rig.drive(0.1)
    assert stop.outcome == Outcome.COMPLETED and done.outcome == Outcome.COMPLETED
    assert rig.backend.names() == ["StopMove"]


def test_without_require_verified_an_unverified_command_runs():
    rig = Rig(require_verified=False)
    assert rig.move(0.4, 0.5, verified=False).outcome is None  # running
    rig.drive(0.1)
    assert "Move" in rig.backend.names()


def test_a_posture_sends_its_requests_in_order_and_completes(rig):
    sit = rig.stream.execute(LocomotionCommand(Action.SIT), verified=True)
    rig.stream.tick()
    assert rig.backend.names() == ["StopMove", "Sit"]
    assert sit.outcome == Outcome.COMPLETED and sit.reason == "StopMove and Sit sent"
    up = rig.stream.execute(LocomotionCommand(Action.STAND_UP), verified=True)
    rig.stream.tick()
    assert rig.backend.names()[2:] == ["StandUp", "BalanceStand"] and up.outcome == Outcome.COMPLETED


def test_a_request_the_robot_refuses_ends_the_command_failed_with_its_code(rig):
    rig.backend.codes["Sit"] = 3204
    sit = rig.stream.execute(LocomotionCommand(Action.SIT), verified=True)
    rig.stream.tick()
    assert sit.outcome == Outcome.FAILED and "Sit -> 3204" in sit.reason
    assert rig.errors == [("Sit", 3204)]
    assert rig.stream.status().last_codes == {"StopMove": 0, "Sit": 3204}


def test_a_request_that_raises_is_reported_and_the_stream_goes_on(rig):
    rig.backend.raises["Move"] = RuntimeError("DDS write failed")
    rig.move(0.3, 0.5)
    rig.drive(1.0)
    assert len(rig.backend.times("Move")) == 8 and rig.backend.times("StopMove") == [100.5]
    assert rig.errors[0] == ("Move", -1) and rig.stream.status().error_counts == {"Move": 8}


def test_a_newer_command_or_cmd_vel_preempts_the_running_one(rig):
    first = rig.move(0.3, 2.0)
    rig.drive(0.2)
    second = rig.move(0.5, 2.0)
    assert first.outcome == Outcome.PREEMPTED and "a newer command" in first.reason
    rig.stream.cmd_vel(0.1, 0.0, 0.0)
    assert second.outcome == Outcome.PREEMPTED and "cmd_vel" in second.reason
    rig.drive(0.1)
    assert rig.backend.sent[-1][1:] == ("Move", (0.1, 0.0, 0.0))
    assert "StopMove" not in rig.backend.names()  # the velocity changes without stopping in between


def test_cancel_stops_the_robot_and_ends_the_command_canceled(rig):
    execution = rig.move(0.3, 2.0)
    rig.drive(0.2)
    assert rig.stream.cancel(execution) is True
    rig.stream.tick()
    assert execution.outcome == Outcome.CANCELED and rig.backend.sent[-1][1] == "StopMove"
    assert rig.stream.cancel(execution) is False  # ended already: nothing more to do


def test_halt_sends_stop_move_at_once_and_refuses_commands_until_activated(rig):
    execution = rig.move(0.3, 2.0)
    rig.drive(0.2)
    rig.stream.halt("deactivated")
    assert rig.backend.sent[-1] == (rig.clock.t, "StopMove", ())  # in the caller, no tick needed
    assert execution.outcome == Outcome.STOPPED and "deactivated" in execution.reason
    assert "not active" in rig.move(0.3, 1.0).reason
    rig.drive(0.5)
    assert rig.backend.names().count("Move") == 4  # 0.0, 0.0625, 0.125, 0.1875: nothing after the halt
    rig.stream.activate()
    rig.move(0.3, 0.5)
    rig.drive(0.1)
    assert rig.backend.names().count("Move") > 4


def test_nothing_is_accepted_before_activation():
    clock = FakeClock()
    stream = MoveStream(RecordingBackend(clock), clock)
    assert stream.execute(LocomotionCommand(Action.MOVE, 0.3, 0.0, 0.0, 1.0), True).outcome == Outcome.REJECTED
    assert "not active" in stream.cmd_vel(0.3, 0.0, 0.0)


def test_idle_is_reported_once_the_last_request_of_a_command_is_sent(rig):
    rig.move(0.3, 0.5)
    rig.drive(1.0)
    assert rig.idle == [(100.0, True), (100.0, False), (100.5, True)]


def test_done_sends_nothing_but_a_motion_it_interrupts_ends_with_stop_move(rig):
    done = rig.stream.execute(LocomotionCommand(Action.DONE), verified=True)
    rig.drive(0.1)
    assert done.outcome == Outcome.COMPLETED and rig.backend.sent == []
    rig.move(0.3, 2.0)
    rig.drive(0.1)
    rig.stream.execute(LocomotionCommand(Action.DONE), verified=True)
    rig.stream.tick()
    assert rig.backend.sent[-1][1] == "StopMove"


def test_progress_tells_elapsed_and_remaining_time_and_the_streamed_velocity(rig):
    execution = rig.move(0.4, 1.0, vyaw=0.2)
    rig.drive(0.25)
    p = rig.stream.progress(execution)
    assert (p.elapsed_s, p.remaining_s, p.vx, p.vy, p.vyaw) == (0.25, 0.75, 0.4, 0.0, 0.2)
    rig.drive(1.0)
    p = rig.stream.progress(execution)
    assert (p.elapsed_s, p.remaining_s, p.vx) == (1.0, 0.0, 0.0)


def test_limits_rate_and_staleness_set_on_the_stream_apply_to_the_next_command_and_tick(rig):
    rig.stream.limits = MotionLimits(max_vx=0.2)
    rig.stream.move_rate_hz = 8.0
    rig.move(0.5, 1.0)
    rig.drive(1.5)
    assert {args for _, n, args in rig.backend.sent if n == "Move"} == {(0.2, 0.0, 0.0)}
    assert len(rig.backend.times("Move")) == 8


def test_the_outcomes_are_the_execute_command_actions_result_constants():
    from speculative_vlm_msgs.action import ExecuteCommand

    constants = {name: getattr(ExecuteCommand.Result, name) for name in Outcome.__members__}
    assert constants == {o.name: o.value for o in Outcome}
