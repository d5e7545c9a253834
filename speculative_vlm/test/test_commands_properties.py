"""Model text -> LocomotionCommand: nothing outside the limits, never a guess, lossless round trips."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from speculative_vlm.commands.schema import (
    DEFAULT_LIMITS,
    FIELDS,
    Action,
    CommandError,
    LocomotionCommand,
    parse_command,
)
from speculative_vlm.nodes.command_messages import UnknownActionError, from_msg, text_to_msg, to_msg

from speculative_vlm_msgs.msg import LocomotionCommand as LocomotionCommandMsg

L = DEFAULT_LIMITS

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(min_value=-10, max_value=10),
)
json_values = st.one_of(numbers, st.booleans(), st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2))
near_commands = st.fixed_dictionaries(
    {k: (st.sampled_from([a.value for a in Action] + ["jump", ""]) if k == "action" else json_values) for k in FIELDS},
    optional={"extra": json_values},
)


def within_limits(vx: float, vy: float, vyaw: float, duration: float) -> bool:
    return (
        L.min_vx <= vx <= L.max_vx
        and abs(vy) <= L.max_vy
        and abs(vyaw) <= L.max_vyaw
        and 0.0 <= duration <= L.max_duration
        and all(math.isfinite(v) for v in (vx, vy, vyaw, duration))
    )


def as_text(obj: dict) -> str:
    return json.dumps(obj, allow_nan=True)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), near_commands.map(as_text)))
def test_no_input_string_yields_a_command_outside_the_limits(text):
    try:
        command = parse_command(text)
    except CommandError:
        return
    assert within_limits(command.vx, command.vy, command.vyaw, command.duration)


@settings(max_examples=200, deadline=None)
@given(near_commands.map(as_text))
def test_no_input_string_yields_a_message_outside_the_limits(text):
    try:
        msg = text_to_msg(text, verified=True)
    except CommandError:
        return
    assert within_limits(msg.vx, msg.vy, msg.vyaw, msg.duration)
    assert msg.text == text and msg.verified


valid_commands = st.builds(
    LocomotionCommand,
    action=st.sampled_from(Action),
    vx=st.floats(min_value=L.min_vx, max_value=L.max_vx),
    vy=st.floats(min_value=-L.max_vy, max_value=L.max_vy),
    vyaw=st.floats(min_value=-L.max_vyaw, max_value=L.max_vyaw),
    duration=st.floats(min_value=0.0, max_value=L.max_duration),
)


@settings(max_examples=300, deadline=None)
@given(valid_commands)
def test_every_valid_command_round_trips_through_text(command):
    assert parse_command(command.to_text()) == command


@settings(max_examples=200, deadline=None)
@given(valid_commands)
def test_every_valid_command_round_trips_through_the_message_within_float32(command):
    back = from_msg(to_msg(command, verified=False))
    assert back.action == command.action
    for field in ("vx", "vy", "vyaw", "duration"):
        assert getattr(back, field) == pytest.approx(getattr(command, field), rel=1e-6, abs=1e-6)


def test_a_repeated_key_is_refused_rather_than_guessed():
    text = '{"action": "move", "vx": 0.1, "vx": 0.9, "vy": 0, "vyaw": 0, "duration": 1}'
    with pytest.raises(CommandError, match="duplicate"):
        parse_command(text)


def test_an_integer_too_large_for_a_float_is_refused():
    text = '{"action": "move", "vx": 1' + "0" * 400 + ', "vy": 0, "vyaw": 0, "duration": 1}'
    with pytest.raises(CommandError):
        parse_command(text)


def test_a_message_with_an_unknown_action_is_refused():
    with pytest.raises(UnknownActionError, match="constants"):
        from_msg(LocomotionCommandMsg(action=42))


def test_text_becomes_the_matching_message():
    msg = text_to_msg('{"action": "move", "vx": 0.5, "vy": 0.0, "vyaw": -0.25, "duration": 2.0}', verified=True)
    assert (msg.action, msg.vx, msg.vyaw, msg.duration) == (LocomotionCommandMsg.MOVE, 0.5, -0.25, 2.0)
