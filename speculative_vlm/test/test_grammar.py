"""The command grammar: everything it admits parses, and constrained decoding stays inside it."""

from __future__ import annotations

import random

import pytest
import torch
from speculative_vlm.commands.grammar import GrammarNotFound, command_ebnf, compile_grammar, grammar_source
from speculative_vlm.commands.schema import Limits, parse_command
from speculative_vlm.decoding.grammar import GrammarConstraint
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from tiny_models import noisy_copy, smollm2_tokenizer, tiny_causal_lm

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def compiled():
    return compile_grammar("command", smollm2_tokenizer(), 49152, [EOS])


def random_walk(compiled, rng: random.Random) -> list[int]:
    """Pick uniformly among allowed tokens until the grammar ends."""
    g = GrammarConstraint(compiled, 49152)
    tokens = []
    while not g.terminated:
        allowed = torch.nonzero(g.allowed()).flatten().tolist()
        t = rng.choice(allowed)
        g.accept(t)
        tokens.append(t)
    return tokens


def test_every_text_the_grammar_admits_parses_into_a_command(compiled):
    tok = smollm2_tokenizer()
    rng = random.Random(0)
    for _ in range(40):
        tokens = random_walk(compiled, rng)
        assert tokens[-1] == EOS
        parse_command(tok.decode(tokens[:-1]))


def test_numbers_have_one_decimal_and_stay_inside_the_limits():
    ebnf = command_ebnf(Limits(max_vx=0.3, min_vx=-0.2, max_vy=0.1, max_vyaw=0.25, max_duration=1.0))
    vx = next(line for line in ebnf.splitlines() if line.startswith("vx_value"))
    assert vx == 'vx_value ::= "-0.2" | "-0.1" | "0.0" | "0.1" | "0.2" | "0.3"'
    vyaw = next(line for line in ebnf.splitlines() if line.startswith("vyaw_value"))
    assert '"0.2"' in vyaw and '"0.3"' not in vyaw and '"-0.0"' not in vyaw


def test_canonical_command_text_is_accepted_token_by_token(compiled):
    tok = smollm2_tokenizer()
    text = '{"action":"move","vx":0.5,"vy":0.0,"vyaw":-0.3,"duration":2.0}'
    g = GrammarConstraint(compiled, 49152)
    for t in tok.encode(text) + [EOS]:
        g.accept(t)
    assert g.terminated
    assert parse_command(text).vyaw == -0.3


def test_unknown_grammar_name_says_which_exist():
    with pytest.raises(GrammarNotFound, match="command"):
        grammar_source("xml")


def test_grammar_rollback_returns_to_the_same_masks(compiled):
    tok = smollm2_tokenizer()
    g = GrammarConstraint(compiled, 49152)
    ids = tok.encode('{"action":"stop"')
    before = g.allowed()
    for t in ids:
        g.accept(t)
    g.rollback(len(ids))
    assert torch.equal(g.allowed(), before)
    masks = g.masks_along(ids)
    assert torch.equal(masks[0], before) and g.steps == 0


@pytest.mark.parametrize("exits", [[], [1, 2]], ids=["no-exits", "exits+preemption+pipelining"])
def test_constrained_speculative_output_equals_constrained_target_and_parses(exits):
    target = tiny_causal_lm("llama", seed=8)
    draft = noisy_copy(target, noise=0.02)
    tok = target.tokenizer
    for prompt in ("walk to the red ball", "sit down please"):
        request = SessionRequest(prompt, settings=GenerationSettings(max_new_tokens=64, grammar="command"))
        engine = TargetEngine(target, exit_layers=exits)
        alone = list(engine.generate(engine.open_session(request)))
        with InProcessVerifier(engine) as verifier:
            result = SpeculativeDecoder(draft, verifier, early_threshold=0.0).generate(request)
        assert result.token_ids == alone
        assert result.token_ids[-1] in target.eos_token_ids
        parse_command(result.text)
        assert result.text == tok.decode(alone[:-1])
        assert sum(r.forced for r in result.rounds) + result.prompt_forced > 0


def test_constrained_target_alone_equals_hf_generate_with_the_xgrammar_processor(compiled):
    from speculative_vlm.commands.grammar import hf_logits_processor

    target = tiny_causal_lm("qwen2", seed=8)
    request = SessionRequest("walk to the red ball", settings=GenerationSettings(max_new_tokens=64, grammar="command"))
    engine = TargetEngine(target)
    alone = list(engine.generate(engine.open_session(request)))
    ids = target.encode(request).ids
    out = target.model.generate(
        torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=EOS,
        logits_processor=[hf_logits_processor(compiled)], pad_token_id=0,
    )
    assert out[0, len(ids):].tolist() == alone
