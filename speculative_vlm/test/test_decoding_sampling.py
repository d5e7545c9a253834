"""Sampling: speculative decoding draws from the target's own distribution (lossless).

Statistical tests use a chi-square goodness-of-fit at significance level ALPHA = 0.001,
with fixed seeds, so a run is deterministic and a correct implementation fails with
probability 0.001 over the choice of seeds.
"""

from __future__ import annotations

import collections

import torch
from scipy.stats import chisquare
from speculative_vlm.decoding import rules
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.policy import FixedLength
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from tiny_models import noisy_copy, tiny_causal_lm

ALPHA = 0.001


def chi_square_p(counts: collections.Counter, probs: dict[int, float], n: int) -> float:
    support = sorted(probs)
    assert set(counts) <= set(support), f"sampled outside the target's support: {set(counts) - set(support)}"
    observed = [counts.get(t, 0) for t in support]
    total = sum(probs[t] for t in support)
    expected = [probs[t] / total * n for t in support]
    return float(chisquare(observed, expected).pvalue)


def test_rejection_sampling_rule_reproduces_the_target_distribution():
    # Small vocabulary (6 tokens), draft q far from target p, 3-token blocks.
    gen = torch.Generator().manual_seed(0)
    settings = GenerationSettings(temperature=1.0)
    p_logits = torch.randn(4, 6, generator=gen) * 1.5
    q = rules.warp(torch.randn(6, generator=gen) * 1.5, settings)
    p0 = rules.warp(p_logits[0], settings)
    counts: collections.Counter = collections.Counter()
    n = 3000
    for _ in range(n):
        drafts = [int(torch.multinomial(q, 1, generator=gen)) for _ in range(3)]
        qs = [{i: float(q[i]) for i in range(6)}] * 3
        outcome = rules.verify_sampling(p_logits, drafts, qs, settings, gen)
        first = drafts[0] if outcome.accepted > 0 else outcome.token
        counts[first] += 1
    assert chi_square_p(counts, {i: float(p0[i]) for i in range(6)}, n) > ALPHA


def test_warp_applies_temperature_top_k_and_top_p_the_same_way_everywhere():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    probs = rules.warp(logits, GenerationSettings(temperature=0.5, top_k=3))
    assert (probs[3:] == 0).all() and abs(float(probs.sum()) - 1) < 1e-6
    nucleus = rules.warp(logits, GenerationSettings(temperature=1.0, top_p=0.5))
    assert int((nucleus > 0).sum()) == 1  # the top token alone holds >= 0.5 of the mass here
    assert torch.allclose(rules.warp(logits[None], GenerationSettings(top_k=3))[0], rules.warp(logits, GenerationSettings(top_k=3)))


def test_first_sampled_tokens_of_speculative_decoding_follow_the_target_distribution():
    # top_k=5 keeps the effective vocabulary small so a few hundred runs suffice.
    target = tiny_causal_lm("llama", seed=11)
    draft = noisy_copy(target, noise=0.3, seed=2)
    base = dict(temperature=1.0, top_k=5, max_new_tokens=2)
    request = SessionRequest("walk to the red ball", settings=GenerationSettings(**base))
    engine = TargetEngine(target)
    sess = engine.open_session(request)
    logits = target.forward([sess.kv])[0][-1]
    p = rules.warp(logits, request.settings)
    probs = {int(i): float(p[i]) for i in torch.nonzero(p).flatten()}
    counts: collections.Counter = collections.Counter()
    n, rejected = 250, 0
    with InProcessVerifier(engine) as verifier:
        decoder = SpeculativeDecoder(draft, verifier, policy=FixedLength(3), preempt=False)
        for seed in range(n):
            req = SessionRequest(request.prompt, settings=GenerationSettings(**base, seed=seed))
            result = decoder.generate(req)
            counts[result.token_ids[0]] += 1
            rejected += result.rounds[0].accepted == 0
    assert rejected > 0, "the draft should be rejected sometimes, or the residual path is untested"
    assert chi_square_p(counts, probs, n) > ALPHA
