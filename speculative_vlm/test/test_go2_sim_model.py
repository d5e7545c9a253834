"""The simulated Go2's sport-mode rules and kinematics (no DDS: a manual clock drives it)."""

from __future__ import annotations

import json
import math

import pytest
from speculative_vlm.go2.sim_model import REFUSED, Go2Limits, Go2Model, Mode
from unitree_sdk2py.go2.sport import sport_api as api


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run(model: Go2Model, clock: Clock, seconds: float, move: tuple[float, float, float] | None = None, rate: float = 25.0) -> None:
    """Advance in 10 ms physics steps, sending Move at ``rate`` when ``move`` is given."""
    steps = int(round(seconds / 0.01))
    every = max(1, int(round(1.0 / rate / 0.01)))
    for i in range(steps):
        if move is not None and i % every == 0:
            model.handle(api.SPORT_API_ID_MOVE, json.dumps({"x": move[0], "y": move[1], "z": move[2]}))
        clock.t += 0.01
        model.step()


@pytest.fixture
def sim():
    clock = Clock()
    return Go2Model(Go2Limits(), clock=clock), clock


def test_move_for_two_seconds_covers_the_commanded_distance_minus_the_acceleration_ramp(sim):
    model, clock = sim
    run(model, clock, 2.0, move=(0.6, 0.0, 0.0))
    ramp = 0.6 / model.limits.accel
    expected = 0.6 * (2.0 - ramp) + 0.5 * 0.6 * ramp
    assert model.snapshot().x == pytest.approx(expected, abs=0.02)
    assert model.snapshot().mode == Mode.LOCOMOTION


def test_velocity_changes_no_faster_than_the_acceleration_limit(sim):
    model, clock = sim
    run(model, clock, 0.2, move=(1.0, 0.0, 0.0))
    assert model.snapshot().vx == pytest.approx(0.2 * model.limits.accel, abs=0.02)


def test_the_robot_stops_by_itself_when_move_is_not_resent(sim):
    model, clock = sim
    run(model, clock, 1.0, move=(0.5, 0.0, 0.0))
    run(model, clock, model.limits.move_timeout - 0.05)
    assert model.snapshot().vx == pytest.approx(0.5)
    run(model, clock, 0.6)
    s = model.snapshot()
    assert s.vx == 0.0 and s.mode == Mode.BALANCE_STAND


def test_stop_move_decelerates_to_rest(sim):
    model, clock = sim
    run(model, clock, 1.0, move=(0.5, 0.0, 0.0))
    assert model.handle(api.SPORT_API_ID_STOPMOVE, "{}") == 0
    run(model, clock, 0.1)
    assert 0.0 < model.snapshot().vx < 0.5
    run(model, clock, 0.5)
    assert model.snapshot().vx == 0.0


def test_yaw_rate_turns_the_heading_and_moves_along_it(sim):
    model, clock = sim
    run(model, clock, 3.0, move=(0.0, 0.0, 1.0))
    model.handle(api.SPORT_API_ID_STOPMOVE, "{}")
    run(model, clock, 1.0)
    yaw = model.snapshot().yaw
    assert yaw > 2.0
    x0, y0 = model.snapshot().x, model.snapshot().y
    run(model, clock, 2.0, move=(0.5, 0.0, 0.0))
    s = model.snapshot()
    assert math.atan2(s.y - y0, s.x - x0) == pytest.approx(yaw, abs=0.01)


def test_move_is_ignored_while_lying_down(sim):
    model, clock = sim
    assert model.handle(api.SPORT_API_ID_STANDDOWN, "{}") == 0
    run(model, clock, 1.0, move=(0.5, 0.0, 0.0))
    s = model.snapshot()
    assert s.x == 0.0 and s.mode == Mode.LIE_DOWN and s.ignored_moves > 0


def test_stand_up_locks_the_joints_until_balance_stand(sim):
    model, clock = sim
    model.handle(api.SPORT_API_ID_STANDDOWN, "{}")
    assert model.handle(api.SPORT_API_ID_STANDUP, "{}") == 0
    run(model, clock, 0.5, move=(0.5, 0.0, 0.0))
    assert model.snapshot().x == 0.0 and model.snapshot().mode == Mode.JOINT_LOCK
    assert model.handle(api.SPORT_API_ID_BALANCESTAND, "{}") == 0
    run(model, clock, 0.5, move=(0.5, 0.0, 0.0))
    assert model.snapshot().x > 0.0


@pytest.mark.parametrize(
    ("setup", "request_id"),
    [
        (api.SPORT_API_ID_STANDDOWN, api.SPORT_API_ID_SIT),  # cannot sit from lying down
        (None, api.SPORT_API_ID_RISESIT),  # cannot rise from a sit it is not in
        (api.SPORT_API_ID_SIT, api.SPORT_API_ID_STANDUP),  # must RiseSit first
        (api.SPORT_API_ID_DAMP, api.SPORT_API_ID_BALANCESTAND),  # needs RecoveryStand from damping
    ],
)
def test_requests_that_make_no_sense_in_the_current_state_are_refused(sim, setup, request_id):
    model, _ = sim
    if setup is not None:
        assert model.handle(setup, "{}") == 0
    before = model.snapshot().mode
    assert model.handle(request_id, "{}") == REFUSED
    assert model.snapshot().mode == before


def test_sit_then_rise_sit_returns_to_balance_stand(sim):
    model, _ = sim
    assert model.handle(api.SPORT_API_ID_SIT, "{}") == 0
    assert model.snapshot().mode == Mode.SIT
    assert model.handle(api.SPORT_API_ID_RISESIT, "{}") == 0
    assert model.snapshot().mode == Mode.BALANCE_STAND


def test_recovery_stand_brings_a_damped_robot_back_to_balance_stand(sim):
    model, _ = sim
    model.handle(api.SPORT_API_ID_DAMP, "{}")
    assert model.handle(api.SPORT_API_ID_RECOVERYSTAND, "{}") == 0
    assert model.snapshot().mode == Mode.BALANCE_STAND


def test_a_malformed_move_is_refused_and_does_not_move(sim):
    model, clock = sim
    assert model.handle(api.SPORT_API_ID_MOVE, '{"x": "fast"}') == REFUSED
    run(model, clock, 0.2)
    assert model.snapshot().x == 0.0
