"""train-target: the expert's data on the robot's prompts, LoRA fine-tuning, the shipped adapter, the command.

A tiny random Llama on SmolLM2's vocabulary stands in for the target, so these run in seconds;
they check the mechanics, not the quality (the card of a real run reports that).
"""

import argparse
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from speculative_vlm.cli import train_target as train_target_cli
from speculative_vlm.commands.prompts import SYSTEM_PROMPT
from speculative_vlm.decoding import model_store
from speculative_vlm.decoding.models import ModelAdapter
from speculative_vlm.decoding.verifier import SessionRequest
from speculative_vlm.evaluation.splits import heldout_combos
from speculative_vlm.training import finetune, target_data, train_target
from tiny_models import smollm2_tokenizer, tiny_causal_lm
from transformers import AutoModelForCausalLM

RECIPE = target_data.DataRecipe(episodes=6, perturbed_episodes=3, perturb=0.5, seed=1)


@pytest.fixture(scope="module")
def examples():
    return target_data.expert_examples(RECIPE, log=lambda _: None)


@pytest.fixture(scope="module")
def tokens(examples):
    tok = smollm2_tokenizer()
    return target_data.tokenize(examples, tok, tok.convert_tokens_to_ids("<|im_end|>"))


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """A tiny random llama saved as a model folder with SmolLM2's tokenizer."""
    adapter = tiny_causal_lm(layers=2)
    adapter.model.save_pretrained(tmp_path / "tiny-base")
    adapter.tokenizer.save_pretrained(tmp_path / "tiny-base")
    return tmp_path / "tiny-base"


def answer_accuracy(model, tokens) -> float:
    """Share of answer tokens the model's greedy next-token choice gets right (teacher forced)."""
    with torch.inference_mode():
        batch = finetune.collate(tokens, pad_id=2)
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        _, accuracy = finetune.batch_loss(lm, batch)
    return accuracy


def test_examples_come_from_train_split_rollouts_only_plain_and_perturbed(examples):
    ids = {e.episode for e in examples}
    assert ids and all(i.startswith("train-") for i in ids)
    indices = {int(i.split("-")[1]) for i in ids}
    assert max(indices) >= RECIPE.episodes  # the perturbed rollouts are further episodes
    held = heldout_combos(RECIPE.split_seed)
    assert not [e for e in examples if any(c in e.instruction.lower() for c in held)]
    assert len({(e.prompt, e.answer) for e in examples}) == len(examples)


def test_rollouts_are_cached_and_an_identical_run_reuses_them(tmp_path, monkeypatch):
    recipe = target_data.DataRecipe(episodes=2, perturbed_episodes=1)
    config = target_data.WorldConfig.from_config()
    first = target_data.cached_examples(recipe, config, tmp_path, log=lambda _: None)
    assert len(list(tmp_path.glob("examples-*.json"))) == 1

    def no_rollouts(*args, **kwargs):
        raise AssertionError("rolled out again")

    monkeypatch.setattr(target_data, "expert_examples", no_rollouts)
    assert target_data.cached_examples(recipe, config, tmp_path, log=lambda _: None) == first
    with pytest.raises(AssertionError, match="rolled out again"):  # another recipe is another file
        target_data.cached_examples(target_data.DataRecipe(episodes=3, perturbed_episodes=1), config, tmp_path)


def test_training_prompts_are_token_for_token_what_the_engine_encodes(examples, tokens):
    engine_side = ModelAdapter(tiny_causal_lm(layers=1).model, smollm2_tokenizer())
    for example, token in list(zip(examples, tokens, strict=True))[:5]:
        request = SessionRequest(prompt=example.prompt, system=SYSTEM_PROMPT)
        assert list(token.prompt_ids) == engine_side.encode(request).ids
        answer = smollm2_tokenizer().decode(token.answer_ids)
        assert answer == example.answer + "<|im_end|>"


def test_a_batch_with_a_shared_prefix_has_the_loss_of_each_example_alone(tokens):
    model = tiny_causal_lm(layers=2).model
    batch = finetune.collate(tokens[:5], pad_id=2)
    assert batch.prefix.numel() > 100  # the system prompt is run once
    with torch.inference_mode():
        loss, _ = finetune.batch_loss(model, batch)
        total, count = 0.0, 0
        for t in tokens[:5]:
            logits = model(torch.tensor([list(t.prompt_ids) + list(t.answer_ids)])).logits[0]
            n = len(t.prompt_ids)
            total += torch.nn.functional.cross_entropy(logits[n - 1 : n - 1 + len(t.answer_ids)],
                                                       torch.tensor(t.answer_ids), reduction="sum").item()
            count += len(t.answer_ids)
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_batch_order_is_seeded_and_covers_every_example_each_epoch():
    order = finetune.batch_order(10, 4, epochs=2, seed=3)
    assert order == finetune.batch_order(10, 4, epochs=2, seed=3)
    assert order != finetune.batch_order(10, 4, epochs=2, seed=4)
    assert len(order) == 5
    first_epoch = [i for chunk in order[:3] for i in chunk]
    assert sorted(first_epoch) == list(range(10))


def test_batches_of_similar_lengths_pad_less_and_still_cover_every_example():
    lengths = [random.Random(i).randint(60, 140) for i in range(64)]
    plain = finetune.batch_order(64, 8, epochs=1, seed=0)
    bucketed = finetune.batch_order(64, 8, epochs=1, seed=0, lengths=lengths)
    assert sorted(i for chunk in bucketed for i in chunk) == list(range(64))
    assert bucketed == finetune.batch_order(64, 8, epochs=1, seed=0, lengths=lengths)

    def padded(order):
        return sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in order)

    assert padded(bucketed) < 0.9 * padded(plain)


def test_lora_training_lowers_the_loss_and_the_merged_reload_answers_like_the_data(tokens, tiny_folder, tmp_path):
    data = tokens[:8]
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    before = answer_accuracy(model, data)
    peft_model = finetune.add_lora(model, finetune.LoraSettings(rank=8, alpha=16, dropout=0.0))
    settings = finetune.FitSettings(epochs=12, batch_size=4, lr=2e-2, warmup_steps=2, log_every=2)
    report = finetune.fit(peft_model, data, pad_id=2, settings=settings, log=lambda _: None)
    assert report.steps == report.planned_steps == 24 and not report.stopped_by_cap
    assert report.curve[-1][1] < 0.5 * report.curve[0][1]

    size_mb = train_target.save_adapter(peft_model, tmp_path / "adapter", str(tiny_folder))
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights and all(w.dtype == torch.float16 for w in weights.values()) and 0 < size_mb < 1
    assert not (tmp_path / "adapter" / "README.md").exists()
    merged = model_store.merge_adapter(tmp_path / "adapter")
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not [k for k in reloaded.state_dict() if "lora" in k]
    after = answer_accuracy(reloaded, data)
    assert before < 0.1 and after > 0.7  # greedy next tokens were the training answers' 86% of the time


def test_batched_single_step_answers_are_the_engines_answers_one_at_a_time():
    from dataclasses import replace

    from speculative_vlm.evaluation.episodes import generate_episodes
    from speculative_vlm.evaluation.policies import ModelPolicy
    from speculative_vlm.evaluation.single_step import expert_states
    from speculative_vlm.evaluation.splits import make_splits
    from speculative_vlm.evaluation.world import WorldConfig

    adapter = tiny_causal_lm(layers=2)
    config = replace(WorldConfig.from_config(), progress_line=True)
    states = expert_states(generate_episodes(make_splits(0)["heldout"], 3, 0), config, 5)
    with torch.inference_mode():
        rows = train_target.single_step(adapter.model, adapter.tokenizer, states, batch_size=3)
    policy = ModelPolicy(adapter, max_new_tokens=64)
    try:
        assert [r["text"] for r in rows] == [policy.act(s.observation).text for s in states]
    finally:
        policy.close()


def test_fit_stops_at_the_time_cap_and_says_so(tokens, tiny_folder):
    model = finetune.add_lora(AutoModelForCausalLM.from_pretrained(tiny_folder), finetune.LoraSettings(rank=2))
    settings = finetune.FitSettings(epochs=50, batch_size=4, minutes=0.0001)
    report = finetune.fit(model, tokens[:8], pad_id=2, settings=settings, log=lambda _: None)
    assert report.stopped_by_cap and 0 < report.steps < report.planned_steps


def test_train_target_writes_the_adapter_its_card_log_and_metrics(tiny_folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    train_target_cli.add_arguments(parser)
    out = tmp_path / "command-target-lora"
    args = parser.parse_args([
        "--target", str(tiny_folder), "--out", str(out), "--episodes", "3", "--perturbed-episodes", "1",
        "--epochs", "1", "--batch-size", "4", "--rank", "4", "--single-step", "3", "--probe", "2",
        "--probe-every", "2", "--eval-episodes", "2", "--eval-max-steps", "1", "--data-cache", str(tmp_path / "data"),
    ])
    assert train_target_cli.run(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "card.md",
                                                     "metrics.json", "train-log.txt"]
    assert not out.with_name(out.name + ".partial").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_folder) and config["r"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    for model in ("stock", "trained"):
        assert metrics[model]["single_step"]["answers"] == 3
        assert metrics[model]["closed_loop"]["episodes"] == 2
    assert metrics["training"]["steps"] == metrics["training"]["planned_steps"] > 0
    assert metrics["data"]["recipe"]["episodes"] == 3 and metrics["data"]["examples"] > 0
    assert all("\nProgress: moved " in s["prompt"] for s in metrics["trained"]["samples"])  # as trained
    log = (out / "train-log.txt").read_text()
    assert "[train] step" in log and "peak RSS" in log and "[phase] train:" in log and "probe at step 2" in log
    card = (out / "card.md").read_text()
    assert "single-step direction correctness" in card and "closed-loop success" in card
    assert "train split only" in card and "LoRA rank 4" in card
