"""train-target --vision: frames and batches, a few training steps, the shipped delta, its merge by prepare-models.

A tiny random llama stands in for the text target and a tiny vision tower for the real one, so
these run in seconds; they check the mechanics, not the quality (the card of a real run reports it).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from speculative_vlm.cli import train_target as train_target_cli
from speculative_vlm.decoding import model_store
from speculative_vlm.decoding.models import load_model
from speculative_vlm.evaluation.phrasings import TRAIN
from speculative_vlm.evaluation.splits import make_splits
from speculative_vlm.evaluation.world import WorldConfig
from speculative_vlm.training import target_data, train_vlm, vlm_frames
from tiny_models import VOCAB, tiny_causal_lm
from tiny_vlm_target import TINY_VISION_ARGS, tiny_vlm_target
from transformers import AutoModelForImageTextToText

CONFIG = replace(WorldConfig.from_config(), progress_line=True)
RECIPE = target_data.DataRecipe(episodes=4, perturbed_episodes=1, perturb=0.5, seed=1)


@pytest.fixture(scope="module")
def frames():
    return target_data.frame_examples(RECIPE, CONFIG, None, log=lambda _: None)


@pytest.fixture(scope="module")
def tiny():
    return tiny_vlm_target(seed=5)


@pytest.fixture
def backbone_folder(tmp_path) -> Path:
    """A tiny random llama saved as a model folder with SmolLM2's tokenizer (the text target's stand-in)."""
    adapter = tiny_causal_lm(layers=2)
    adapter.model.save_pretrained(tmp_path / "tiny-backbone")
    adapter.tokenizer.save_pretrained(tmp_path / "tiny-backbone")
    return tmp_path / "tiny-backbone"


def steps(processor, seed: int = 0) -> train_vlm.FrameSteps:
    return train_vlm.FrameSteps(processor, CONFIG, VOCAB, 2, seed, vlm_frames.Variation(),
                                make_splits(0)[TRAIN].combos)


def test_a_batch_feeds_every_image_token_with_its_pixels_and_scores_answers_only(frames, tiny):
    _, processor, _ = tiny
    tokens = train_vlm.tokenize_frames(frames[:4], processor, stop_id=2)
    batch = train_vlm.collate_frames(tokens, steps(processor).frames(tokens, 1), processor, pad_id=2)
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image not in batch.prefix.tolist()
    assert int((batch.suffix == image).sum()) == 4 * len(tokens)
    assert batch.images["pixel_values"].shape == (4, 1, 3, 32, 32)
    assert batch.targets.tolist() == [t for e in tokens for t in e.answer_ids]


def test_the_prefix_never_reaches_the_image_even_when_every_prompt_says_the_same(frames, tiny):
    _, processor, _ = tiny
    same = train_vlm.tokenize_frames([frames[0]] * 3, processor, stop_id=2)
    batch = train_vlm.collate_frames(same, steps(processor).frames(same, 1), processor, pad_id=2)
    first = processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    assert len(batch.prefix) == same[0].prompt_ids.index(first)


def test_the_batch_loss_is_the_models_own_loss_on_the_answer_tokens(frames, tiny):
    vlm, processor, _ = tiny
    tokens = train_vlm.tokenize_frames(frames[:3], processor, stop_id=2)
    jpegs = steps(processor).frames(tokens, 1)
    with torch.inference_mode():
        loss, _ = train_vlm.frame_batch_loss(vlm, train_vlm.collate_frames(tokens, jpegs, processor, 2), VOCAB)
        losses = []
        for e, jpeg in zip(tokens, jpegs, strict=True):
            ids = torch.tensor([list(e.prompt_ids) + list(e.answer_ids)])
            logits = vlm(input_ids=ids, **train_vlm.pixels(processor, [jpeg])).logits[0, :, :VOCAB]
            n = len(e.answer_ids)
            losses.append(torch.nn.functional.cross_entropy(logits[-n - 1 : -1], ids[0, -n:], reduction="sum"))
    assert torch.allclose(loss, sum(losses) / sum(len(e.answer_ids) for e in tokens), atol=1e-4)


def test_frames_of_a_step_differ_between_steps_and_repeat_for_the_same_seed(frames, tiny):
    _, processor, _ = tiny
    tokens = train_vlm.tokenize_frames(frames[:6], processor, stop_id=2)
    first, again, later = steps(processor).frames(tokens, 1), steps(processor).frames(tokens, 1), \
        steps(processor).frames(tokens, 2)
    assert first == again
    assert sum(a != b for a, b in zip(first, later, strict=True)) >= 4


def test_a_caption_row_asks_for_its_own_frame_described_and_the_rest_stay_commands(frames, tiny):
    import cv2
    import numpy as np
    from speculative_vlm.commands.scene_text import describe_image

    _, processor, _ = tiny
    tokens = train_vlm.tokenize_frames(frames[:8], processor, stop_id=2)
    maker = train_vlm.FrameSteps(processor, CONFIG, VOCAB, 2, 0, vlm_frames.Variation(), make_splits(0)[TRAIN].combos,
                                 caption=0.5, stop_id=2)
    jpegs = maker.frames(tokens, 3)
    rows = maker.captioned(tokens, jpegs, 3)
    captions = [i for i, r in enumerate(rows) if r.family == "caption"]
    assert 0 < len(captions) < len(rows) and maker.captions == len(captions)
    assert rows == maker.captioned(tokens, jpegs, 3)  # the same rows for the same seed and step
    for i, (row, token, jpeg) in enumerate(zip(rows, tokens, jpegs, strict=True)):
        if i not in captions:
            assert row == token
            continue
        said = describe_image(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
        assert processor.tokenizer.decode(row.answer_ids[:-1]) == said and row.answer_ids[-1] == 2
        text = processor.tokenizer.decode(row.prompt_ids)
        assert train_vlm.CAPTION_REQUEST in text and "Instruction:" not in text
    batch = train_vlm.collate_frames(rows, jpegs, processor, pad_id=2)  # both kinds share a batch
    assert batch.targets.tolist() == [t for r in rows for t in r.answer_ids]
    none = train_vlm.FrameSteps(processor, CONFIG, VOCAB, 2, 0, vlm_frames.Variation(), make_splits(0)[TRAIN].combos)
    assert none.captioned(tokens, jpegs, 3) == tokens


def test_the_step_loss_logs_caption_and_command_tokens_apart(frames, tiny):
    import re

    vlm, processor, _ = tiny
    tokens = train_vlm.tokenize_frames(frames[:8], processor, stop_id=2)
    lines: list[str] = []
    maker = train_vlm.FrameSteps(processor, CONFIG, VOCAB, 2, 0, vlm_frames.Variation(), make_splits(0)[TRAIN].combos,
                                 caption=0.5, stop_id=2, log=lines.append)
    with torch.no_grad():
        loss, _ = maker(vlm, tokens, 0)  # step 0 logs
    rows = maker.captioned(tokens, maker.frames(tokens, 0), 0)
    counts = {kind: sum(len(r.answer_ids) for r in rows if (r.family == "caption") == (kind == "caption"))
              for kind in ("caption", "command")}
    seen = {k: (float(v), int(n)) for k, v, n in re.findall(r"(caption|command) ([\d.]+) \((\d+) tokens\)", lines[-1])}
    assert {k: n for k, (_, n) in seen.items()} == counts and all(counts.values())
    mean = sum(v * n for v, n in seen.values()) / sum(counts.values())
    assert abs(mean - loss.item()) < 1e-3


def test_only_the_vision_tower_connector_and_lora_train(tiny):
    vlm, _, _ = tiny_vlm_target(seed=6)
    model = train_vlm.add_trainable(vlm, rank=2, alpha=4, dropout=0.0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".vision_model." in n for n in names) and any(".connector." in n for n in names)
    text = [n for n in names if ".text_model." in n]
    assert text and all("lora_" in n for n in text)
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    frozen = train_vlm.add_trainable(tiny_vlm_target(seed=6)[0], rank=0, alpha=0, dropout=0.0)
    assert not any(".text_model." in n for n, p in frozen.named_parameters() if p.requires_grad)


def test_batched_vlm_single_step_answers_are_the_engines_answers_one_at_a_time(tiny):
    from speculative_vlm.decoding.models import ModelAdapter
    from speculative_vlm.evaluation.episodes import generate_episodes
    from speculative_vlm.evaluation.phrasings import HELDOUT
    from speculative_vlm.evaluation.policies import ModelPolicy
    from speculative_vlm.evaluation.single_step import expert_states

    vlm, processor, _ = tiny
    states = expert_states(generate_episodes(make_splits(0)[HELDOUT], 3, 0), CONFIG, 4)
    rows = train_vlm.single_step(vlm, processor, states, VOCAB, batch_size=3)
    policy = ModelPolicy(ModelAdapter(vlm, processor.tokenizer, processor), perception="image", max_new_tokens=64)
    try:
        assert [r["text"] for r in rows] == [policy.act(s.observation).text for s in states]
    finally:
        policy.close()


def test_an_image_policy_sends_the_frame_and_no_describer_text_even_from_a_state_perceived_both_ways(tiny):
    from speculative_vlm.decoding.models import ModelAdapter
    from speculative_vlm.evaluation.episodes import generate_episodes
    from speculative_vlm.evaluation.phrasings import HELDOUT
    from speculative_vlm.evaluation.policies import ModelPolicy
    from speculative_vlm.evaluation.single_step import expert_states

    vlm, processor, _ = tiny
    state = expert_states(generate_episodes(make_splits(0)[HELDOUT], 1, 0), CONFIG, 1)[0]
    assert state.observation.scene_text and state.observation.frame_jpeg  # the eval's states hold both
    policy = ModelPolicy(ModelAdapter(vlm, processor.tokenizer, processor), perception="image")
    try:
        request = policy.request(state.observation)
    finally:
        policy.close()
    assert request.image == state.observation.frame_jpeg
    assert state.observation.scene_text not in request.prompt and "\nScene: \n" in request.prompt


def test_the_text_draft_of_an_image_policy_reads_the_scene_text_and_the_target_never_does(tiny):
    from speculative_vlm.decoding.models import ModelAdapter
    from speculative_vlm.evaluation.episodes import generate_episodes
    from speculative_vlm.evaluation.phrasings import HELDOUT
    from speculative_vlm.evaluation.policies import ModelPolicy
    from speculative_vlm.evaluation.single_step import expert_states

    vlm, processor, _ = tiny
    state = expert_states(generate_episodes(make_splits(0)[HELDOUT], 1, 0), CONFIG, 1)[0]
    target = ModelAdapter(vlm, processor.tokenizer, processor)
    for perception, reads in (("scene_text", True), ("none", False)):
        policy = ModelPolicy(target, tiny_causal_lm(layers=1), perception="image", draft_perception=perception)
        try:
            request = policy.request(state.observation)
        finally:
            policy.close()
        assert state.observation.scene_text not in request.prompt
        assert (state.observation.scene_text in request.draft_prompt) == reads


def test_a_noisy_image_policy_sees_another_frame_the_same_each_time(tiny):
    from speculative_vlm.decoding.models import ModelAdapter
    from speculative_vlm.evaluation.episodes import generate_episodes
    from speculative_vlm.evaluation.phrasings import HELDOUT
    from speculative_vlm.evaluation.policies import ModelPolicy
    from speculative_vlm.evaluation.run import make_policy
    from speculative_vlm.evaluation.single_step import expert_states
    from speculative_vlm.go2.render import with_noise

    vlm, processor, _ = tiny
    state = expert_states(generate_episodes(make_splits(0)[HELDOUT], 1, 0), CONFIG, 1)[0]
    clean = state.observation.frame_jpeg
    assert with_noise(clean, 14, 3) == with_noise(clean, 14, 3) != with_noise(clean, 14, 4) != clean
    policy = ModelPolicy(ModelAdapter(vlm, processor.tokenizer, processor), perception="image", frame_noise=14)
    try:
        one, two = policy.request(state.observation), policy.request(state.observation)
    finally:
        policy.close()
    assert one.image == two.image and one.image != clean
    with pytest.raises(ValueError, match="grey levels"):
        make_policy("image~loud:x", CONFIG)


def vision_args(backbone: Path, out: Path, tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_target_cli.add_arguments(parser)
    return parser.parse_args([
        "--vision", "--backbone", str(backbone), "--out", str(out), *TINY_VISION_ARGS,
        "--episodes", "3", "--perturbed-episodes", "1", "--epochs", "1", "--batch-size", "4", "--rank", "2",
        "--single-step", "2", "--probe", "1", "--probe-every", "2", "--eval-episodes", "1", "--eval-max-steps", "1",
        "--threads", "1", "--data-cache", str(tmp_path / "data"), "--vision-pretrain-steps", "2", *extra])


def test_vision_flag_takes_the_vlm_defaults_and_leaves_the_text_targets_alone():
    parser = argparse.ArgumentParser()
    train_target_cli.add_arguments(parser)
    text, vision = parser.parse_args([]), parser.parse_args(["--vision"])
    train_vlm.resolve_mode_defaults(text)
    train_vlm.resolve_mode_defaults(vision)
    assert (text.epochs, text.rank, text.minutes) == tuple(train_vlm.MODE_DEFAULTS[k][0]
                                                          for k in ("epochs", "rank", "minutes"))
    assert text.rank != vision.rank
    assert (vision.epochs, vision.rank, vision.minutes) == tuple(train_vlm.MODE_DEFAULTS[k][1]
                                                                   for k in ("epochs", "rank", "minutes"))
    assert vision.backbone == model_store.ROBOT_TARGET
    explicit = parser.parse_args(["--vision", "--epochs", "0.5"])
    train_vlm.resolve_mode_defaults(explicit)
    assert explicit.epochs == 0.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny train-target --vision run (a few steps) and its output folder."""
    tmp_path = tmp_path_factory.mktemp("vision-run")
    adapter = tiny_causal_lm(layers=2)
    backbone = tmp_path / "tiny-backbone"
    adapter.model.save_pretrained(backbone)
    adapter.tokenizer.save_pretrained(backbone)
    out = tmp_path / model_store.VLM_DELTA
    assert train_target_cli.run(vision_args(backbone, out, tmp_path, "--max-steps", "3")) == 0
    return backbone, out


def test_train_target_vision_writes_the_delta_its_card_log_and_metrics(trained):
    backbone, out = trained
    names = sorted(p.name for p in out.iterdir())
    for name in ("adapter_config.json", "adapter_model.safetensors", model_store.VLM_WEIGHTS_FILE,
                 model_store.VLM_CONFIG_FILE, model_store.VLM_DELTA_FILE, "generation_config.json",
                 "processor_config.json", "tokenizer.json", "card.md", "train-log.txt", "metrics.json"):
        assert name in names, name
    assert "config.json" not in names  # the delta is not a model folder the store would resolve
    assert not out.with_name(out.name + ".partial").exists()
    delta = json.loads((out / model_store.VLM_DELTA_FILE).read_text())
    assert delta["backbone"] == str(backbone) and delta["base_vocab"] == VOCAB and delta["lora"]["rank"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 3
    for model in ("text", "trained"):
        assert metrics[model]["single_step"]["answers"] == 2
        assert metrics[model]["closed_loop"]["episodes"] == 1
    assert metrics["frames"]["plain"] + metrics["frames"]["varied"] == 3 * 4  # stage 1's frames counted apart
    assert metrics["vision_pretrain"]["steps"] == 2 and metrics["vision_pretrain"]["grid"] == 2
    assert metrics["prefill"]["tokens"] > 0 and metrics["prefill"]["prompt_ms"] > 0
    assert all("\nScene: \nProgress: moved " in s["prompt"] for s in metrics["trained"]["samples"])  # pixels alone
    log = (out / "train-log.txt").read_text()
    assert "[train] step 3/" in log and "min left" in log and "[phase] train:" in log and "probe at step 2" in log
    card = (out / "card.md").read_text()
    assert "train split only" in card and "closed-loop success" in card and "4 image" in card
    assert "Stage 1" in card and "2 steps of 16 frames" in card and "[phase] vision pretraining:" in log


def test_the_delta_weighs_what_its_weights_weigh_in_fp16(trained):
    _, out = trained
    from safetensors.torch import load_file

    for file in (model_store.VLM_WEIGHTS_FILE, "adapter_model.safetensors"):
        assert {v.dtype for v in load_file(out / file).values()} == {torch.float16}


@pytest.fixture
def store(tmp_path, monkeypatch, trained):
    """A store holding the run's backbone under the name the delta names, and the delta shipped."""
    backbone, out = trained
    monkeypatch.setenv("SPECULATIVE_VLM_MODELS", str(tmp_path / "store"))
    shipped = tmp_path / "shipped"
    (shipped / model_store.VLM_DELTA).mkdir(parents=True)
    for f in out.iterdir():
        (shipped / model_store.VLM_DELTA / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(model_store, "bundled_dirs", lambda: [shipped])
    return shipped / model_store.VLM_DELTA


def test_prepare_models_merges_the_vlm_delta_and_the_store_resolves_it(store, trained):
    from safetensors.torch import load_file

    merged = model_store.prepare_merged(model_store.VLM_TARGET)
    assert merged is not None and model_store.resolve(model_store.VLM_TARGET) == merged
    model = AutoModelForImageTextToText.from_pretrained(merged)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert not any("lora_" in k for k in model.state_dict())  # a plain model
    shipped = load_file(store / model_store.VLM_WEIGHTS_FILE)
    state = model.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in shipped.items() if k != model_store.IMAGE_ROWS_KEY)
    base = tiny_causal_lm(layers=2).model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state["model.text_model.layers.0.self_attn.q_proj.weight"], base[q])  # LoRA merged
    assert torch.equal(state["model.text_model.norm.weight"], base["model.norm.weight"])  # no LoRA there
    adapter = load_model(model_store.VLM_TARGET)
    assert adapter.is_vlm and adapter.vocab_size == VOCAB
    stamp = json.loads((merged / model_store.MERGE_STAMP).read_text())
    assert stamp["adapter"] == model_store.VLM_DELTA and stamp["base_stamp"] == "tiny-backbone"


def test_prepare_models_is_idempotent_for_the_vlm(store):
    merged = model_store.prepare_merged(model_store.VLM_TARGET)
    first = (merged / "model.safetensors").stat().st_mtime_ns
    assert model_store.prepare_merged(model_store.VLM_TARGET) == merged
    assert (merged / "model.safetensors").stat().st_mtime_ns == first


def test_the_vlm_target_without_a_shipped_delta_is_not_found_with_a_hint_to_train_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECULATIVE_VLM_MODELS", str(tmp_path / "store"))
    monkeypatch.setattr(model_store, "bundled_dirs", lambda: [])
    assert model_store.prepare_merged(model_store.VLM_TARGET) is None
    with pytest.raises(model_store.ModelNotFound, match="not shipped yet.*train-target --vision"):
        model_store.resolve(model_store.VLM_TARGET)
