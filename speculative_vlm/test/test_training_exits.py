"""Self-distilled exit adapters learn to agree with the final layer on the target's own text,
for the very requests the robot's drafter sends, about train-split states only.

(A tiny random model has little that generalises to validation prompts, so this checks the
fit on the training text; validation agreement for SmolLM2 is in the exit heads' card.)"""

from __future__ import annotations

import json

import yaml
from speculative_vlm.commands.prompts import SYSTEM_PROMPT, user_message
from speculative_vlm.decoding.exits import save_exit_heads
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import DraftBlock, GenerationSettings, SessionRequest
from speculative_vlm.evaluation.episodes import generate_episodes
from speculative_vlm.evaluation.phrasings import HELDOUT
from speculative_vlm.evaluation.splits import heldout_combos, make_splits
from speculative_vlm.evaluation.world import SIM_CONFIG
from speculative_vlm.training import train_exits as train_exits_module
from speculative_vlm.training.target_data import prompt_ids
from speculative_vlm.training.train_exits import (
    VALIDATION_START,
    RobotRequests,
    config_target,
    train_exits,
)
from tiny_models import tiny_causal_lm

from speculative_vlm import cli

UNCONSTRAINED = RobotRequests(settings=GenerationSettings(max_new_tokens=12, grammar=""))


def test_training_raises_agreement_with_the_final_layer_and_the_checkpoint_serves_early_verdicts(tmp_path):
    target = tiny_causal_lm("llama", seed=9)
    heads, report = train_exits(
        target, [1, 2], train_prompts=6, validation_prompts=2, steps=60, robot=UNCONSTRAINED, log=lambda *_: None
    )
    for layer in ("1", "2"):
        assert report["train_agreement_after"][layer] > report["train_agreement_before"][layer] + 0.1
        assert 0.0 <= report["agreement_after"][layer] <= 1.0
    path = save_exit_heads(heads, tmp_path / "exits.pt", target, report)
    engine = TargetEngine(target, exit_layers=[2], exit_heads=path)
    assert engine.exits.trained and engine.exit_layers == [2]
    sess = engine.open_session(SessionRequest("sit down"))
    early = []
    engine.verify([(sess, DraftBlock(0, 0, (), (5, 6)))], on_early=lambda s, v: early.append(v))
    assert [v.exit_layer for v in early] == [2]


def test_the_target_is_asked_exactly_the_drafters_requests(monkeypatch):
    robot = UNCONSTRAINED
    opened: list[SessionRequest] = []

    class RecordingEngine(TargetEngine):
        def open_session(self, request):
            opened.append(request)
            return super().open_session(request)

    monkeypatch.setattr(train_exits_module, "TargetEngine", RecordingEngine)
    _, report = train_exits(tiny_causal_lm("llama", seed=3), [1], train_prompts=3, validation_prompts=2, steps=1,
                            robot=robot, log=lambda *_: None)
    expected = [robot.request(e) for e in (*robot.examples(3), *robot.examples(2, start=VALIDATION_START))]
    assert opened == expected
    assert report["prompts"]["train_episodes"] == [e.episode for e in robot.examples(3)]


def test_a_request_is_the_drafters_system_prompt_and_user_message_with_the_progress_line():
    target = tiny_causal_lm("llama", seed=1)
    for example in RobotRequests().examples(11):
        request = RobotRequests().request(example)
        assert request.system == SYSTEM_PROMPT
        assert request.prompt == user_message(example.instruction, example.scene_text, example.progress)
        assert request.prompt.startswith("Instruction: ") and "\nProgress: moved " in request.prompt
        assert request.settings.grammar == "command" and request.settings.greedy
        # The engine encodes it to the very ids train-target fine-tuned the target on.
        assert target.encode(request).ids == prompt_ids(target.tokenizer, example.instruction, example.scene_text,
                                                         example.progress)


def test_no_prompt_comes_from_the_held_out_split():
    robot = RobotRequests()
    train, validation = robot.examples(22), robot.examples(11, start=VALIDATION_START)
    held_combos = heldout_combos(robot.split_seed)
    held_instructions = {e.instruction.strip().lower()
                         for e in generate_episodes(make_splits(robot.split_seed)[HELDOUT], 66, seed=robot.seed)}
    assert len(train) == 22 and len(validation) == 11
    assert not {e.episode for e in train} & {e.episode for e in validation}
    for example in (*train, *validation):
        assert example.episode.startswith("train-")
        text = robot.request(example).prompt.lower()
        assert not [c for c in held_combos if c in text], text
        assert example.instruction.strip().lower() not in held_instructions


def test_the_configs_drafter_section_decides_the_progress_line_system_prompt_and_grammar(tmp_path):
    sections = yaml.safe_load(SIM_CONFIG.read_text())
    drafter = sections["drafter"]["ros__parameters"]
    robot = RobotRequests.from_config(SIM_CONFIG)
    assert robot.progress_line == drafter["progress_line"] and robot.settings.grammar == drafter["grammar"]
    assert robot.system_prompt == (drafter.get("system_prompt") or SYSTEM_PROMPT)
    drafter.update(progress_line=False, system_prompt="Answer in JSON.", max_new_tokens=20)
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(sections))
    request = RobotRequests.from_config(path).request(RobotRequests().examples(1)[0])
    assert request.system == "Answer in JSON." and "Progress" not in request.prompt
    assert request.settings.max_new_tokens == 20


def test_the_default_target_is_the_configs_verifier_model_and_an_image_drafter_sends_the_frame(tmp_path):
    sections = yaml.safe_load(SIM_CONFIG.read_text())
    assert config_target(SIM_CONFIG) == sections["cloud_server"]["ros__parameters"]["model"]
    sections["drafter"]["ros__parameters"]["perception"] = "image"
    path = tmp_path / "vlm.yaml"
    path.write_text(yaml.safe_dump(sections))
    robot = RobotRequests.from_config(path)
    example = next(e for e in robot.examples(4) if e.scene_text != "no coloured objects in view.")
    request = robot.request(example)
    assert request.image[:2] == b"\xff\xd8" and "\nScene: \n" in request.prompt  # a JPEG, no scene text
    assert example.scene_text not in request.prompt
    # The frame is the one the rollout's robot saw: described, it names the objects the example's scene text names.
    import re

    import cv2
    import numpy as np
    from speculative_vlm.commands.scene_text import describe_image

    frame = cv2.imdecode(np.frombuffer(request.image, np.uint8), cv2.IMREAD_COLOR)
    def named(text):
        return re.findall(r"(\w+ \w+): about", text)

    assert named(describe_image(frame)) == named(example.scene_text) != []


def test_exits_train_on_a_vlm_targets_image_prompts(tmp_path):
    from speculative_vlm.decoding.models import ModelAdapter
    from tiny_vlm_target import tiny_vlm_target

    vlm, processor, _ = tiny_vlm_target(seed=6)
    target = ModelAdapter(vlm, processor.tokenizer, processor)
    robot = RobotRequests(perception="image", settings=GenerationSettings(max_new_tokens=6, grammar=""))
    heads, report = train_exits(target, [0], train_prompts=3, validation_prompts=2, steps=5, robot=robot,
                                log=lambda _: None)
    assert report["prompts"]["perception"] == "image" and report["train_positions"] > 0
    assert set(report["agreement_after"]) == {"0"}


def test_the_command_trains_the_configs_target_with_the_progress_line_asked_for(tmp_path, capsys):
    target = tiny_causal_lm("llama", seed=4)
    target.model.save_pretrained(tmp_path / "target")
    target.tokenizer.save_pretrained(tmp_path / "target")
    sections = yaml.safe_load(SIM_CONFIG.read_text())
    sections["cloud_server"]["ros__parameters"]["model"] = str(tmp_path / "target")
    sections["drafter"]["ros__parameters"].update(progress_line=False, max_new_tokens=8)
    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump(sections))
    code = cli.main(["train-exits", "--config", str(config), "--progress-line", "--layers", "1", "--steps", "2",
                     "--train-prompts", "2", "--validation-prompts", "1", "--out", str(tmp_path / "exits.pt"), "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["prompts"]["progress_line"] is True and report["prompts"]["max_new_tokens"] == 8
    engine = TargetEngine(target, exit_layers=[1], exit_heads=tmp_path / "exits.pt")
    assert engine.exits.trained
