"""Draft training: the target's answers, the distillation, the acceptance replay, the command.

A tiny random Llama on SmolLM2's vocabulary stands in for the target, so these run in
seconds; the shipped draft's quality is checked in test_training_shipped.py.
"""

import argparse
import json
import math
import random
from pathlib import Path

import pytest
import torch
from speculative_vlm.commands.schema import parse_command
from speculative_vlm.training import acceptance, distill, teacher_data, train_draft
from speculative_vlm.training.draft_model import DraftShape, ProjectedDraft
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHIPPED_DRAFT = Path(__file__).resolve().parents[1] / "models" / "command-draft"


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
def examples(teacher) -> list[teacher_data.Example]:
    # The same spec as the command's training data below, so that test reuses these answers.
    return teacher.collect(teacher_data.DataSpec(commands=4, general=4, seed="train", batch_size=4),
                           log=lambda _: None)


def test_batched_generation_with_a_shared_prefix_equals_one_prompt_at_a_time(teacher):
    import xgrammar as xgr

    prompts = [teacher._prompt_ids("command", "test", i) for i in range(2)]
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


def test_collected_answers_are_cached_and_reused(teacher, examples):
    shards = sorted(teacher.cache_dir.glob("*.pt"))
    spec = teacher_data.DataSpec(commands=4, general=4, seed="train", batch_size=4)
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


def test_train_draft_writes_a_loadable_checkpoint_with_a_card(tiny_target, teacher, examples, tmp_path):
    parser = argparse.ArgumentParser()
    train_draft.add_arguments(parser)
    args = parser.parse_args([
        "--target", str(tiny_target), "--out", str(tmp_path / "draft"), "--data-cache", str(teacher.cache_dir.parent),
        "--prompts", "4", "--general", "4", "--heldout", "4", "--gen-batch", "4", "--minutes", "1",
        "--max-steps", "3", "--layers", "1", "--hidden", "64", "--batch-size", "4", "--threads", "1",
    ])
    assert train_draft.run(args) == 0
    out = tmp_path / "draft"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 3
    card = (out / "card.md").read_text()
    assert "## Data recipe" in card and f"{metrics['commands']['acceptance']:.3f}" in card


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
