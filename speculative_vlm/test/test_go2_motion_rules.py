"""The motion node's rules as plain data: the clamps it applies, the sport requests of each action, and the
command limits, written once in the command schema and agreeing everywhere they are used."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from speculative_vlm.commands.grammar import command_ebnf
from speculative_vlm.commands.schema import DEFAULT_LIMITS as BOUNDS
from speculative_vlm.commands.schema import json_schema
from speculative_vlm.go2.motion_rules import LIMIT_RANGES, SPORT_REQUESTS, MotionLimits

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


# ---- the command limits are defined once (commands/schema.py) and agree everywhere -------------
CONFIG = Path(__file__).resolve().parents[1] / "config"


def test_the_motion_nodes_default_limits_are_the_command_schemas_bounds():
    assert MotionLimits() == MotionLimits(max_vx=BOUNDS.max_vx, min_vx=BOUNDS.min_vx, max_vy=BOUNDS.max_vy,
                                          max_vyaw=BOUNDS.max_vyaw, max_duration_s=BOUNDS.max_duration)


def test_a_limit_may_be_set_tighter_than_the_schemas_bound_but_never_past_it():
    defaults = MotionLimits()
    assert set(LIMIT_RANGES) == {f.name for f in fields(MotionLimits)}
    for name, (lo, hi) in LIMIT_RANGES.items():
        assert lo <= getattr(defaults, name) <= hi
    assert [LIMIT_RANGES[n][1] for n in ("max_vx", "max_vy", "max_vyaw", "max_duration_s")] == [
        BOUNDS.max_vx, BOUNDS.max_vy, BOUNDS.max_vyaw, BOUNDS.max_duration]
    assert LIMIT_RANGES["min_vx"][0] == BOUNDS.min_vx


def test_the_grammar_and_the_json_schema_allow_exactly_the_schemas_bounds():
    schema = json_schema()["properties"]
    assert (schema["vx"]["minimum"], schema["vx"]["maximum"]) == (BOUNDS.min_vx, BOUNDS.max_vx)
    assert (schema["vy"]["minimum"], schema["vy"]["maximum"]) == (-BOUNDS.max_vy, BOUNDS.max_vy)
    assert (schema["vyaw"]["minimum"], schema["vyaw"]["maximum"]) == (-BOUNDS.max_vyaw, BOUNDS.max_vyaw)
    assert schema["duration"]["maximum"] == BOUNDS.max_duration
    rules = dict(line.split(" ::= ") for line in command_ebnf().splitlines())
    for key, lo, hi in [("vx", BOUNDS.min_vx, BOUNDS.max_vx), ("vy", -BOUNDS.max_vy, BOUNDS.max_vy),
                        ("vyaw", -BOUNDS.max_vyaw, BOUNDS.max_vyaw), ("duration", 0.0, BOUNDS.max_duration)]:
        values = [float(v.strip().strip('"')) for v in rules[f"{key}_value"].split("|")]
        assert (min(values), max(values)) == (lo, hi), key


def test_the_shipped_motion_yaml_states_the_defaults():
    params = yaml.safe_load((CONFIG / "motion.yaml").read_text())["motion"]["ros__parameters"]
    assert MotionLimits.from_params(params) == MotionLimits()


@pytest.mark.parametrize("config", ["sim.yaml", "robot.yaml", "motion.yaml"])
def test_every_shipped_config_keeps_the_motion_limits_within_the_schemas_bounds(config):
    params = yaml.safe_load((CONFIG / config).read_text())["motion"]["ros__parameters"]
    for name, (lo, hi) in LIMIT_RANGES.items():
        assert lo <= params.get(name, getattr(MotionLimits(), name)) <= hi, f"{config}: {name}"
