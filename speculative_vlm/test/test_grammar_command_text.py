"""command_text: the text the command grammar writes for a command (what a teacher must produce)."""

from __future__ import annotations

import pytest
from speculative_vlm.commands.grammar import command_text, compile_grammar
from speculative_vlm.commands.schema import Action, LocomotionCommand, parse_command
from speculative_vlm.decoding.grammar import GrammarConstraint
from tiny_models import smollm2_tokenizer

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def compiled():
    return compile_grammar("command", smollm2_tokenizer(), 49152, [EOS])


def accepted(compiled, text: str) -> bool:
    g = GrammarConstraint(compiled, 49152)
    try:
        for t in smollm2_tokenizer().encode(text) + [EOS]:
            g.accept(t)
    except Exception:
        return False
    return g.terminated


def test_command_text_is_compact_with_fixed_key_order():
    text = command_text(LocomotionCommand(Action.MOVE, 0.5, 0.0, -0.3, 2.0))
    assert text == '{"action":"move","vx":0.5,"vy":0.0,"vyaw":-0.3,"duration":2.0}'


def test_negative_zero_and_long_decimals_are_written_as_the_grammar_writes_them():
    text = command_text(LocomotionCommand(Action.MOVE, -0.0, 0.04, -0.04, 1.26))
    assert text == '{"action":"move","vx":0.0,"vy":0.0,"vyaw":0.0,"duration":1.3}'


@pytest.mark.parametrize("command", [
    LocomotionCommand(Action.MOVE, 1.0, -0.5, 1.5, 5.0),
    LocomotionCommand(Action.MOVE, -0.5, 0.5, -1.5, 0.1),
    LocomotionCommand(Action.STOP),
    LocomotionCommand(Action.SIT),
    LocomotionCommand(Action.STAND_UP),
    LocomotionCommand(Action.STAND_DOWN),
    LocomotionCommand(Action.DONE),
])
def test_every_command_inside_the_limits_is_accepted_by_the_grammar_and_parses_back(compiled, command):
    text = command_text(command)
    assert accepted(compiled, text)
    assert parse_command(text) == command


def test_a_value_outside_the_limits_is_not_accepted(compiled):
    assert not accepted(compiled, command_text(LocomotionCommand(Action.MOVE, 1.2, 0.0, 0.0, 1.0)))
