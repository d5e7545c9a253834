"""Train-like and held-out splits never meet: objects, layouts and wording (the generalisation test)."""

from __future__ import annotations

from speculative_vlm.commands.prompts import COLOURS
from speculative_vlm.evaluation.episodes import FAMILIES, generate_episodes
from speculative_vlm.evaluation.families import Family
from speculative_vlm.evaluation.phrasings import HELDOUT, TEMPLATES, TRAIN
from speculative_vlm.evaluation.splits import all_combos, heldout_combos, make_splits
from speculative_vlm.go2.scene import SHAPES

SPLITS = make_splits(0)
TRAIN_EPISODES = generate_episodes(SPLITS[TRAIN], 330, seed=0)
HELDOUT_EPISODES = generate_episodes(SPLITS[HELDOUT], 330, seed=0)


def combos_in(episode) -> set[str]:
    return {o.name.removeprefix("the ") for o in episode.scene.objects}


def test_no_training_scene_holds_a_held_out_combination():
    held = set(heldout_combos(0))
    assert held and all(not combos_in(e) & held for e in TRAIN_EPISODES)


def test_held_out_instructions_name_only_held_out_combinations():
    named = {e.intent.target for e in HELDOUT_EPISODES if e.intent.target}
    assert named and named <= set(heldout_combos(0))
    assert not named & {e.intent.target for e in TRAIN_EPISODES}


def test_every_colour_and_shape_is_still_seen_in_training():
    train = SPLITS[TRAIN].combos
    assert {c.split(" ")[0] for c in train} == set(COLOURS)
    assert {c.split(" ")[1] for c in train} == set(SHAPES)


def test_the_held_out_combinations_depend_on_the_split_seed_and_only_on_it():
    assert heldout_combos(0) == heldout_combos(0)
    assert heldout_combos(0) != heldout_combos(1)
    assert set(heldout_combos(1)) < set(all_combos())


def test_scene_layouts_are_disjoint():
    assert not set(SPLITS[TRAIN].layouts) & set(SPLITS[HELDOUT].layouts)
    assert {e.layout for e in TRAIN_EPISODES} <= set(SPLITS[TRAIN].layouts)
    assert {e.layout for e in HELDOUT_EPISODES} <= set(SPLITS[HELDOUT].layouts)


def test_templates_are_disjoint_for_every_family():
    for key, by_split in TEMPLATES.items():
        assert by_split[TRAIN] and by_split[HELDOUT], key
        assert not set(by_split[TRAIN]) & set(by_split[HELDOUT]), key


def test_no_held_out_instruction_appears_in_training():
    # Blank instructions (train "", held-out "   ") are refused before any model sees them.
    train = {e.instruction.strip().lower() for e in TRAIN_EPISODES}
    held = [e.instruction for e in HELDOUT_EPISODES if e.instruction.strip()]
    assert held and not [h for h in held if h.strip().lower() in train]


def test_held_out_wording_uses_styles_training_never_does():
    held = [e.instruction for e in HELDOUT_EPISODES]
    train = [e.instruction for e in TRAIN_EPISODES]
    assert any(h.isupper() for h in held) and not any(t.isupper() for t in train if t.strip())
    assert any(h.startswith("could you ") for h in held) and not any("could you" in t.lower() for t in train)


def test_episodes_are_reproducible_from_the_seed():
    again = generate_episodes(SPLITS[HELDOUT], 22, seed=0)
    assert again == HELDOUT_EPISODES[:22]
    assert generate_episodes(SPLITS[HELDOUT], 22, seed=1) != again


def test_families_are_dealt_in_turn():
    assert [e.intent.family for e in TRAIN_EPISODES[: len(FAMILIES)]] == list(FAMILIES)


def test_objects_an_absent_instruction_names_are_not_in_the_scene():
    absent = [e for e in HELDOUT_EPISODES + TRAIN_EPISODES if e.intent.family == Family.ABSENT]
    assert absent and all(e.intent.target not in combos_in(e) for e in absent)
