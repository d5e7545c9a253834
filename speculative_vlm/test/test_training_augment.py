"""Training wordings (training/augment.py): fresh train-split wordings of each step's intent, restyled by
train-only surface changes, never a held-out style, the answers untouched."""

import random

import pytest
from speculative_vlm.evaluation.families import DEFAULT_TURN_DEG, Family, Intent
from speculative_vlm.evaluation.phrasings import TEMPLATES, TRAIN
from speculative_vlm.training import augment, target_data

RECIPE = target_data.DataRecipe(episodes=22, perturbed_episodes=4, seed=1)


@pytest.fixture(scope="module")
def examples():
    return target_data.expert_examples(RECIPE, log=lambda _: None)


@pytest.fixture(scope="module")
def intents():
    return {i: e.intent for i, e in target_data.recipe_episodes(RECIPE).items()}


def test_rewording_changes_the_words_and_nothing_else(examples, intents):
    out = augment.reworded(examples, intents, share=1.0, restyle_share=0.5, seed=3)
    assert len(out) == len(examples)
    changed = [(a, b) for a, b in zip(examples, out, strict=True) if a.instruction != b.instruction]
    assert len(changed) > len(examples) // 2
    for a, b in zip(examples, out, strict=True):
        assert (a.episode, a.step, a.scene_text, a.progress, a.answer) == (b.episode, b.step, b.scene_text,
                                                                             b.progress, b.answer)


def test_a_share_of_zero_keeps_every_instruction(examples, intents):
    assert augment.reworded(examples, intents, share=0.0, restyle_share=1.0) == examples


def test_rewording_is_reproducible_from_its_seed(examples, intents):
    one = augment.reworded(examples, intents, 0.75, 0.4, seed=1)
    assert one == augment.reworded(examples, intents, 0.75, 0.4, seed=1)
    assert one != augment.reworded(examples, intents, 0.75, 0.4, seed=2)


def test_a_fresh_wording_names_the_same_object_and_amount(examples, intents):
    for a, b in zip(examples, augment.reworded(examples, intents, 1.0, 0.0, seed=5), strict=True):
        intent = intents[a.episode]
        if intent.target:
            assert intent.target in b.instruction.lower(), (intent, b.instruction)
        if intent.family in (Family.WALK,) or (intent.family == Family.TURN and intent.amount != DEFAULT_TURN_DEG):
            assert f"{intent.amount:g}" in b.instruction, (intent, b.instruction)


def test_restyling_never_uses_a_held_out_style():
    rng = random.Random(0)
    texts = [t.format(obj="red ball", n="2", deg="45") for by_split in TEMPLATES.values() for t in by_split[TRAIN]]
    for _ in range(20):
        for text in texts:
            styled = augment.restyle(text, rng)
            words = [w for w in styled.split() if any(c.isalpha() for c in w)]
            assert not styled.isupper(), styled
            assert len(words) < 2 or not all(w[:1].isupper() for w in words), styled  # Title Case is held-out
            assert "could you" not in styled.lower() and "thanks" not in styled.lower(), styled


def test_a_slip_never_touches_the_object_or_the_direction():
    rng = random.Random(1)
    for _ in range(200):
        slipped = augment._keyboard_slip("walk left to the orange ball slowly", rng)
        assert {"left", "orange", "ball"} <= set(slipped.split())


def test_an_amount_that_is_the_default_may_be_left_out():
    intent = Intent(Family.TURN, direction=1, amount=DEFAULT_TURN_DEG)
    drawn = {augment.given_amount(intent, random.Random(i)) for i in range(20)}
    assert drawn == {True, False}
    assert all(augment.given_amount(Intent(Family.TURN, direction=1, amount=45.0), random.Random(i))
               for i in range(20))
