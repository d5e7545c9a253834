"""The motion node's rules as plain data: the clamps it applies and the sport requests of each action."""

from __future__ import annotations

import math

from speculative_vlm.go2.motion_rules import SPORT_REQUESTS, MotionLimits

SIM = MotionLimits(max_vx=0.8, min_vx=-0.3, max_vy=0.4, max_vyaw=1.0, max_duration_s=5.0)


def test_velocities_are_clamped_to_each_limit_on_both_sides():
    assert SIM.clamp_velocity(2.0, 1.0, 3.0) == (0.8, 0.4, 1.0)
    assert SIM.clamp_velocity(-2.0, -1.0, -3.0) == (-0.3, -0.4, -1.0)
    assert SIM.clamp_velocity(0.5, -0.2, 0.3) == (0.5, -0.2, 0.3)


def test_a_non_finite_velocity_becomes_zero():
    assert SIM.clamp_velocity(math.nan, math.inf, -math.inf) == (0.0, 0.0, 0.0)


def test_duration_is_clamped_and_nan_means_no_motion():
    assert SIM.clamp_duration(9.0) == 5.0
    assert SIM.clamp_duration(-1.0) == 0.0
    assert SIM.clamp_duration(math.nan) == 0.0
    assert SIM.clamp_duration(1.5) == 1.5


def test_limits_come_from_a_motion_nodes_parameters_and_unknown_names_are_ignored():
    limits = MotionLimits.from_params({"max_vx": 0.8, "min_vx": -0.3, "max_vyaw": 1, "move_rate_hz": 25.0})
    assert limits == MotionLimits(max_vx=0.8, min_vx=-0.3, max_vyaw=1.0)


def test_posture_actions_stop_first_and_standing_up_ends_in_balance_stand():
    assert SPORT_REQUESTS["sit"] == ("StopMove", "Sit")
    assert SPORT_REQUESTS["stand_down"] == ("StopMove", "StandDown")
    assert SPORT_REQUESTS["stand_up"][-1] == "BalanceStand"
