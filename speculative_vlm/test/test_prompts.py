"""The robot prompt: one builder for the drafter node and the draft's training data."""

import random
from pathlib import Path

import pytest
from speculative_vlm.commands import prompts
from speculative_vlm.commands.schema import Action

SHIPPED_DRAFT = Path(__file__).resolve().parents[1] / "models" / "command-draft"


def test_system_prompt_names_every_action_and_every_field_with_its_unit():
    for action in Action:
        assert action.value in prompts.SYSTEM_PROMPT
    for phrase in ('"vx"', '"vy"', '"vyaw"', '"duration"', "m/s", "rad/s", "seconds"):
        assert phrase in prompts.SYSTEM_PROMPT


def test_user_message_is_the_instruction_then_the_scene():
    text = prompts.user_message(" walk to the red ball ", "red ball: 2.0 m away, straight ahead.")
    assert text == "Instruction: walk to the red ball\nScene: red ball: 2.0 m away, straight ahead."


def test_messages_are_system_then_user():
    messages = prompts.build_messages("sit", "no coloured objects in view.")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == prompts.SYSTEM_PROMPT


def test_rendered_prompt_opens_the_assistant_turn_and_keeps_our_system_prompt():
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(SHIPPED_DRAFT)
    text = prompts.render_prompt(tokenizer, "sit", "no coloured objects in view.")
    assert text.endswith("<|im_start|>assistant\n")
    assert prompts.SYSTEM_PROMPT in text and "SmolLM" not in text


def test_sampled_tasks_are_reproducible_from_the_seed():
    assert prompts.sample_task(random.Random("a:1")) == prompts.sample_task(random.Random("a:1"))


def test_sampled_scene_text_describes_the_sampled_objects():
    for i in range(50):
        task = prompts.sample_task(random.Random(i))
        for obj in task.objects:
            assert f"{obj.name}: " in task.scene_text


def test_instructions_about_an_object_mostly_name_one_in_view():
    rng = random.Random(0)
    tasks = [prompts.sample_task(rng) for _ in range(300)]
    about_visible = [t for t in tasks if any(o.name in t.instruction for o in t.objects)]
    about_missing = [t for t in tasks if any(f"{c} {s}" in t.instruction for c in prompts.COLOURS
                                              for s in prompts.SHAPES) and t not in about_visible]
    assert len(about_visible) > len(tasks) / 2
    assert about_missing, "some instructions must ask for an object that is not there"
