"""Training examples come from the expert on the train split only, as the robot's own prompts."""

from __future__ import annotations

from speculative_vlm.commands.prompts import SYSTEM_PROMPT
from speculative_vlm.commands.schema import parse_command
from speculative_vlm.evaluation.examples import training_examples
from speculative_vlm.evaluation.families import Family
from speculative_vlm.evaluation.splits import heldout_combos


def test_examples_are_robot_prompts_labelled_with_expert_commands():
    examples = list(training_examples(11))
    assert {e.family for e in examples} >= {f.value for f in Family} - {Family.REFUSE.value}
    for e in examples:
        assert e.episode.startswith("train-")
        parse_command(e.answer)
        assert e.prompt.startswith(f"Instruction: {e.instruction.strip()}\nScene: ")
        assert "\nProgress: moved " in e.prompt
        assert e.messages()[0]["content"] == SYSTEM_PROMPT and e.messages()[1]["content"] == e.prompt


def test_no_example_names_a_held_out_combination():
    held = heldout_combos(0)
    examples = list(training_examples(22, seed=2))
    assert examples and not [e.instruction for e in examples if any(c in e.instruction.lower() for c in held)]


def test_examples_are_reproducible_and_perturbation_visits_other_states():
    plain = list(training_examples(11, seed=1))
    assert plain == list(training_examples(11, seed=1))
    perturbed = list(training_examples(11, seed=1, perturb=1.0))
    assert [e.prompt for e in perturbed] != [e.prompt for e in plain]
    assert all(parse_command(e.answer) for e in perturbed)
