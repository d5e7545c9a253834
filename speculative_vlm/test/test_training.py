"""Draft training: the robot's prompts, the target's answers, the distillation, the acceptance replay, the command.

A tiny random Llama on SmolLM2's vocabulary stands in for the target, so these run in
seconds; the shipped draft's quality is checked in test_training_shipped.py. The robot's
prompts come from a few rollouts in the in-process simulated Go2.
"""

import argparse
import json
import math
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from speculative_vlm.cli import train_draft
from speculative_vlm.commands.schema import parse_command
from speculative_vlm.decoding import model_store
from speculative_vlm.evaluation.episodes import generate_episodes
from speculative_vlm.evaluation.phrasings import HELDOUT, TRAIN
from speculative_vlm.evaluation.splits import make_splits
from speculative_vlm.evaluation.world import SIM_CONFIG, WorldConfig
from speculative_vlm.training import acceptance, distill, target_data, teacher_data
from speculative_vlm.training.draft_model import DraftShape, ProjectedDraft
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHIPPED_DRAFT = Path(__file__).resolve().parents[1] / "models" / "command-draft"
RECIPE = target_data.DataRecipe(episodes=6, perturbed_episodes=2)  # a few of train-target's rollouts
CONFIG = replace(WorldConfig.from_config(SIM_CONFIG), progress_line=True)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-target")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(SHIPPED_DRAFT).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(tiny_target, tmp_path_factory) -> teacher_data.TeacherData:
    return teacher_data.TeacherData(tiny_target, tmp_path_factory.mktemp("answers"))


@pytest.fixture(scope="module")
def rollout_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rollouts")


@pytest.fixture(scope="module")
def heldout_prompts() -> list[teacher_data.RobotPrompt]:
    return teacher_data.heldout_prompts(4, CONFIG)


@pytest.fixture(scope="module")
def train_prompts(rollout_cache, heldout_prompts) -> list[teacher_data.RobotPrompt]:
    # As train-draft samples them with its defaults (below, the command reuses these rollouts and answers).
    prompts, _ = teacher_data.training_prompts(4, RECIPE, CONFIG, rollout_cache,
                                               exclude={p.text for p in heldout_prompts}, log=lambda _: None)
    return prompts


@pytest.fixture(scope="module")
def examples(teacher, train_prompts) -> list[teacher_data.Example]:
    # The same spec as the command's training data below, so that test reuses these answers.
    return teacher.collect(teacher_data.DataSpec(tuple(train_prompts), general=4, seed="train", batch_size=4),
                           log=lambda _: None)


def test_training_prompts_are_states_of_the_targets_train_split_rollouts_with_the_progress_line(
        teacher, train_prompts, rollout_cache):
    rollouts = target_data.cached_examples(RECIPE, CONFIG, rollout_cache, log=lambda _: None)
    trained_on = {t.prompt_ids for t in target_data.tokenize(rollouts, teacher.tokenizer, 2)}
    for prompt in train_prompts:
        assert prompt.split == TRAIN and prompt.episode.startswith("train-")
        assert prompt.progress.startswith("moved ") and "\nProgress: moved " in prompt.text
        # The very prompt train-target fine-tuned the target on, token for token.
        assert tuple(teacher.command_ids(prompt)) in trained_on


def test_heldout_prompts_are_one_step_of_each_heldout_episode_and_never_training_prompts(
        heldout_prompts, rollout_cache):
    episodes = {e.id: e for e in generate_episodes(make_splits(0)[HELDOUT], 8, 0)}
    assert len({p.episode for p in heldout_prompts}) == len(heldout_prompts) == 4
    for prompt in heldout_prompts:
        assert prompt.split == HELDOUT and prompt.episode in episodes
        assert prompt.instruction == episodes[prompt.episode].instruction
        assert prompt.progress.startswith("moved ")
    _, pool = teacher_data.training_prompts(1, RECIPE, CONFIG, rollout_cache, log=lambda _: None)
    everything, _ = teacher_data.training_prompts(pool, RECIPE, CONFIG, rollout_cache, log=lambda _: None)
    assert not {p.text for p in heldout_prompts} & {p.text for p in everything}
    assert not {p.instruction for p in heldout_prompts} & {p.instruction for p in everything}


def test_without_the_progress_line_the_prompts_carry_none(rollout_cache):
    prompts, _ = teacher_data.training_prompts(4, RECIPE, CONFIG, rollout_cache, progress_line=False,
                                               log=lambda _: None)
    assert all(p.progress == "" and "Progress:" not in p.text for p in prompts)


def test_the_answer_cache_key_changes_when_the_prompts_change(teacher, train_prompts, examples):
    spec = teacher_data.DataSpec(tuple(train_prompts), general=0, batch_size=4)
    bare = [replace(p, progress="") for p in train_prompts]
    with_line = teacher.shard_path("command", spec, [teacher.command_ids(p) for p in train_prompts])
    without = teacher.shard_path("command", spec, [teacher.command_ids(p) for p in bare])
    others = teacher.shard_path("command", spec, [teacher.command_ids(p) for p in reversed(train_prompts)])
    assert with_line.exists() and len({with_line, without, others}) == 3
    answers = teacher.collect(replace(spec, commands=tuple(bare)), log=lambda _: None)
    assert without.exists()
    assert [e.prompt_ids for e in answers] == [teacher.command_ids(p) for p in bare]


def test_the_answer_cache_key_changes_when_the_targets_weights_change(tiny_target, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(tiny_target, tmp_path / name / "target")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "target")
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "b" / "target")
    same_name = [teacher_data.TeacherData(tmp_path / n / "target", tmp_path / "cache").cache_dir for n in "ab"]
    again = teacher_data.TeacherData(tmp_path / "a" / "target", tmp_path / "cache").cache_dir
    assert same_name[0] != same_name[1] and again == same_name[0]


def test_batched_generation_with_a_shared_prefix_equals_one_prompt_at_a_time(teacher, train_prompts):
    import xgrammar as xgr

    prompts = [teacher.command_ids(p) for p in train_prompts[:2]]
    kwargs = dict(max_new_tokens=16, stop_ids=teacher.stop_ids, pad_id=teacher.pad_id)
    batched = teacher_data.generate_batch(teacher.model, prompts, **kwargs,
                                          matchers=[xgr.GrammarMatcher(teacher.compiled) for _ in prompts])
    for prompt, (answer, _, _) in zip(prompts, batched, strict=True):
        alone = teacher_data.generate_batch(teacher.model, [prompt], **kwargs,
                                            matchers=[xgr.GrammarMatcher(teacher.compiled)])
        assert alone[0][0] == answer


def test_command_answers_follow_the_engine_grammar_and_parse(teacher, examples):
    commands = [e for e in examples if e.kind == "command"]
    assert len(commands) == 4
    for e in commands:
        assert e.answer_ids[-1] in teacher.stop_ids
        parse_command(teacher.tokenizer.decode(e.answer_ids[:-1]))


def test_top_k_is_recorded_for_every_answer_token_with_the_chosen_token_first(examples):
    for e in examples:
        assert e.topk_ids.shape == (len(e.answer_ids), 32)
        assert list(e.topk_ids[:, 0]) == e.answer_ids


def test_collected_answers_are_cached_and_reused(teacher, train_prompts, examples):
    shards = sorted(teacher.cache_dir.glob("*.pt"))
    spec = teacher_data.DataSpec(tuple(train_prompts), general=4, seed="train", batch_size=4)
    again = teacher.collect(spec, log=lambda _: None)
    assert sorted(teacher.cache_dir.glob("*.pt")) == shards
    assert [e.answer_ids for e in again] == [e.answer_ids for e in examples]


def _tiny_draft(teacher) -> ProjectedDraft:
    torch.manual_seed(0)
    return ProjectedDraft(teacher.model.get_input_embeddings().weight, teacher.model.config,
                          DraftShape(layers=1, hidden=32, intermediate=64, heads=1, kv_heads=1))


def test_distillation_lowers_the_loss_on_the_targets_answers(teacher, examples):
    draft = _tiny_draft(teacher)
    batch = distill.collate([e for e in examples if e.kind == "command"], teacher.pad_id)
    head = distill.head_vocabulary(examples)

    def loss() -> float:
        with torch.no_grad():
            return distill.loss_on(draft, batch, 0.5, head, generator=torch.Generator().manual_seed(0))[0].item()

    before = loss()
    settings = distill.TrainSettings(batch_size=4, lr=1e-2, warmup_steps=1, max_steps=10, log_every=1000)
    distill.distil(draft, examples, teacher.pad_id, settings, log=lambda _: None)
    assert loss() < before


def test_a_batch_shares_its_prompt_prefix_and_predicts_every_answer_token(examples):
    commands = [e for e in examples if e.kind == "command"]
    batch = distill.collate(commands, pad_id=2)
    assert len(batch.prefix) > 100  # the system prompt runs once per batch
    assert batch.targets.tolist() == [t for e in commands for t in e.answer_ids]
    for row, col, target in zip(batch.rows, batch.cols, batch.targets, strict=True):
        assert batch.suffix[row, col + 1] == target  # the output at col predicts the next token


def test_the_saved_draft_is_the_model_that_was_trained(teacher, examples, tmp_path):
    draft = _tiny_draft(teacher).eval()
    commands = [e for e in examples if e.kind == "command"][:2]
    batch = distill.collate(commands, teacher.pad_id)
    vocab = torch.arange(draft.target_embedding.shape[0])
    with torch.no_grad():
        emb = draft.embedding()
        hidden = draft.hidden_states(batch.prefix, batch.suffix, batch.attention_mask, batch.position_ids, vocab, emb)
        trained = hidden[0, : len(commands[0].prompt_ids) + len(commands[0].answer_ids) - len(batch.prefix)] @ emb.T
    draft.materialise().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([commands[0].prompt_ids + commands[0].answer_ids])
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits[0, len(batch.prefix):]
    assert torch.allclose(logits, trained, atol=1e-4)


def test_a_draft_identical_to_the_target_is_always_accepted(teacher, examples):
    commands = [e for e in examples if e.kind == "command"]
    report = acceptance.measure(teacher.model, commands, 4, teacher.compiled, frozenset(teacher.stop_ids))
    assert report.acceptance == 1.0
    assert report.rounds == sum(math.ceil(len(e.answer_ids) / 5) for e in commands)


def test_a_draft_that_never_agrees_costs_one_target_pass_per_token(teacher, examples):
    # The tiny target is tied, so it mostly repeats tokens; an untied random draft does not.
    general = [e for e in examples if e.kind == "general"][:2]
    torch.manual_seed(1)
    stranger = LlamaForCausalLM(LlamaConfig(**{**teacher.model.config.to_dict(), "tie_word_embeddings": False})).eval()
    report = acceptance.measure(stranger, general, 4)
    assert report.acceptance < 0.5
    assert report.tokens_per_pass == pytest.approx(report.answer_tokens / report.rounds)


def test_train_draft_writes_a_loadable_checkpoint_with_a_card(tiny_target, teacher, examples, rollout_cache,
                                                              tmp_path):
    parser = argparse.ArgumentParser()
    train_draft.add_arguments(parser)
    args = parser.parse_args([
        "--target", str(tiny_target), "--out", str(tmp_path / "draft"), "--data-cache", str(teacher.cache_dir.parent),
        "--prompts", "4", "--general", "4", "--heldout", "4", "--gen-batch", "4", "--minutes", "1",
        "--max-steps", "3", "--layers", "1", "--hidden", "64", "--batch-size", "4", "--threads", "1",
        "--episodes", str(RECIPE.episodes), "--perturbed-episodes", str(RECIPE.perturbed_episodes),
        "--rollout-cache", str(rollout_cache),
    ])
    shards = set(teacher.cache_dir.glob("*.pt"))
    assert train_draft.run(args) == 0
    out = tmp_path / "draft"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 3
    card = (out / "card.md").read_text()
    assert "## Data recipe" in card and f"{metrics['commands']['acceptance']:.3f}" in card
    # The training answers were the fixture's (the same prompts); only the held-out ones were new.
    new = set(teacher.cache_dir.glob("*.pt")) - shards
    assert sorted(f.name.split("-")[0] for f in new) == ["command", "general"]
    assert metrics["data"]["progress_line"] and metrics["data"]["heldout_episodes"] == 4
    assert sum(r["prompts"] for r in metrics["commands_by_family"].values()) == metrics["commands"]["prompts"] == 4


def test_train_draft_asks_for_the_robot_target_and_says_how_to_make_it_when_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECULATIVE_VLM_MODELS", str(tmp_path / "store"))
    monkeypatch.setattr(model_store, "bundled_dirs", lambda: [])
    parser = argparse.ArgumentParser()
    train_draft.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "draft")])
    assert args.target == model_store.ROBOT_TARGET == "smollm2-135m-robot"
    assert train_draft.run(args) == 2
    error = capsys.readouterr().err
    assert "smollm2-135m-robot" in error and "train-target" in error and "prepare-models" in error
    assert not (tmp_path / "draft").exists()


def test_acceptance_reports_add_up_over_families(teacher, examples):
    commands = [e for e in examples if e.kind == "command"]
    stops = frozenset(teacher.stop_ids)
    whole = acceptance.measure(teacher.model, commands, 3, teacher.compiled, stops)
    parts = [acceptance.measure(teacher.model, [e for e in commands if e.family == f], 3, teacher.compiled, stops)
             for f in {e.family for e in commands}]
    assert acceptance.AcceptanceReport.total(parts) == whole
    assert all(e.family for e in commands)


def test_too_few_examples_for_a_batch_is_refused_with_what_to_do(teacher, examples):
    with pytest.raises(ValueError, match="--batch-size"):
        distill.distil(_tiny_draft(teacher), examples[:2], teacher.pad_id, distill.TrainSettings(batch_size=4))


def test_general_prompts_vary():
    from speculative_vlm.training.general_prompts import sample_general_prompt

    rng = random.Random(0)
    assert len({sample_general_prompt(rng) for _ in range(50)}) > 30


def test_tokens_the_grammar_forces_are_neither_drafted_nor_verified(teacher, examples):
    commands = [e for e in examples if e.kind == "command"]
    plain = acceptance.measure(teacher.model, commands, 4, teacher.compiled, frozenset(teacher.stop_ids))
    forced = acceptance.measure(teacher.model, commands, 4, teacher.compiled, frozenset(teacher.stop_ids),
                                force=True)
    assert forced.forced > 0 and forced.answer_tokens == plain.answer_tokens
    assert forced.acceptance == 1.0
    assert forced.drafted < plain.drafted and forced.rounds <= plain.rounds
