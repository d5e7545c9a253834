"""Verification fails closed: no probability that is not a finite number in [0, 1] ever makes
the rules accept a drafted token (properties over arbitrary floats: nan, infinities,
negatives, values above 1, subnormals)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from speculative_vlm.decoding import rules
from speculative_vlm.decoding.verifier import GenerationSettings

V = 8
DRAFTED = 3  # the drafted token; the target's logits make it by far the most likely
SAMPLING = GenerationSettings(temperature=1.0)
any_float = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
any_logit = st.floats(allow_nan=True, allow_infinity=True, width=32)  # logits are fp32
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def is_probability(x: float) -> bool:
    return math.isfinite(x) and 0.0 <= x <= 1.0


def target_logits(rows: int = 2) -> torch.Tensor:
    """Logits (rows, V) under which the drafted token has p ~ 0.998 at every position."""
    logits = torch.zeros(rows, V)
    logits[:, DRAFTED] = 8.0
    return logits


@settings(max_examples=400, deadline=None)
@given(p=any_float, q=any_float)
def test_the_acceptance_probability_exists_only_for_probabilities(p, q):
    if is_probability(p) and is_probability(q) and q > 0:
        assert 0.0 <= rules.acceptance_probability(p, q) <= 1.0
    else:
        with pytest.raises(rules.InvalidProbability):
            rules.acceptance_probability(p, q)


@settings(max_examples=300, deadline=None)
@given(value=any_float, seed=seeds)
def test_a_draft_probability_that_is_not_a_probability_never_accepts(value, seed):
    # q(x) = value for the drafted token: nan used to give min(1, p/nan) = 1, i.e. always accept.
    generator = torch.Generator().manual_seed(seed)
    if is_probability(value):
        outcome = rules.verify_sampling(target_logits(), [DRAFTED], [{DRAFTED: value}], SAMPLING, generator)
        assert outcome.accepted in (0, 1)
    else:
        with pytest.raises(rules.InvalidProbability):
            rules.verify_sampling(target_logits(), [DRAFTED], [{DRAFTED: value}], SAMPLING, generator)


@settings(max_examples=300, deadline=None)
@given(other=any_float, seed=seeds)
def test_any_bad_entry_of_a_draft_distribution_refuses_the_whole_block(other, seed):
    # The bad value sits on a token that was not drafted: the distribution is still junk.
    q = [{DRAFTED: 0.5, 0: other}]
    generator = torch.Generator().manual_seed(seed)
    if is_probability(other):
        assert rules.verify_sampling(target_logits(), [DRAFTED], q, SAMPLING, generator).accepted in (0, 1)
    else:
        with pytest.raises(rules.InvalidProbability):
            rules.verify_sampling(target_logits(), [DRAFTED], q, SAMPLING, generator)


@settings(max_examples=300, deadline=None)
@given(value=any_logit, row=st.integers(0, 1), column=st.integers(0, V - 1), seed=seeds)
def test_a_target_distribution_made_of_nan_never_accepts(value, row, column, seed):
    # One logit of the target set to anything: nan and +inf poison the softmax; -inf only masks.
    logits = target_logits()
    logits[row, column] = value
    generator = torch.Generator().manual_seed(seed)
    if math.isnan(value) or value == math.inf:
        with pytest.raises(rules.InvalidProbability):
            rules.verify_sampling(logits, [DRAFTED], [{DRAFTED: 0.9}], SAMPLING, generator)
        with pytest.raises(rules.InvalidProbability):
            rules.verify_greedy(logits, [DRAFTED])
    else:
        assert rules.verify_sampling(logits, [DRAFTED], [{DRAFTED: 0.9}], SAMPLING, generator).accepted in (0, 1)
        assert rules.verify_greedy(logits, [DRAFTED]).accepted in (0, 1)


@settings(max_examples=200, deadline=None)
@given(temperature=any_float, seed=seeds)
def test_a_nan_temperature_never_accepts(temperature, seed):
    # Admission refuses such settings first; the rules must not accept on them either.
    generator = torch.Generator().manual_seed(seed)
    settings_ = GenerationSettings(temperature=temperature)
    if math.isnan(temperature):
        with pytest.raises(rules.InvalidProbability):
            rules.verify_sampling(target_logits(), [DRAFTED], [{DRAFTED: 0.9}], settings_, generator)
    else:
        try:
            outcome = rules.verify_sampling(target_logits(), [DRAFTED], [{DRAFTED: 0.9}], settings_, generator)
        except rules.InvalidProbability:
            return  # an infinite temperature turns -inf logits into nan: refused, never accepted
        assert outcome.accepted in (0, 1)


def test_a_row_that_allows_nothing_accepts_nothing_and_gives_no_token():
    # Past a grammar's end every logit is -inf; argmax would say token 0 and accept a drafted 0.
    logits = torch.full((2, V), float("-inf"))
    assert rules.verify_greedy(logits, [0]) == rules.Outcome(0, -1)
    generator = torch.Generator().manual_seed(0)
    assert rules.verify_sampling(logits, [0], [{0: 1.0}], SAMPLING, generator) == rules.Outcome(0, -1)


def test_an_output_that_ends_with_every_draft_accepted_has_no_bonus_token():
    # Sampling under a grammar: the last drafted token ends the output, the bonus row allows nothing.
    logits = target_logits()
    logits[1] = float("-inf")
    generator = torch.Generator().manual_seed(0)
    outcomes = {rules.verify_sampling(logits, [DRAFTED], [{DRAFTED: 0.999}], SAMPLING, generator) for _ in range(20)}
    assert rules.Outcome(1, -1) in outcomes
    assert all(o.token == -1 or o.accepted == 0 for o in outcomes)


def test_valid_probabilities_keep_the_lossless_rule():
    # p(x) / q(x) >= 1 accepts every time; p(x) = 0 rejects every time.
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert rules.verify_sampling(target_logits(), [DRAFTED], [{DRAFTED: 0.5}], SAMPLING, generator).accepted == 1
    masked = target_logits()
    masked[0, DRAFTED] = float("-inf")
    for _ in range(50):
        outcome = rules.verify_sampling(masked, [DRAFTED], [{DRAFTED: 0.5}], SAMPLING, generator)
        assert outcome.accepted == 0 and outcome.token != DRAFTED
