"""A caller can stop the speculative loop between verdicts (``should_stop``): the loop raises
``Cancelled`` with what was verified so far and closes its session, whatever the verifier."""

from __future__ import annotations

import pytest
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import Cancelled, SpeculativeDecoder
from speculative_vlm.decoding.policy import FixedLength
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from tiny_models import tiny_pair

REQUEST = SessionRequest("walk to the red ball", settings=GenerationSettings(max_new_tokens=40))


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(seed=3, noise=0.05, layers=3)


def _decoder(pair, verifier) -> SpeculativeDecoder:
    _, draft = pair
    return SpeculativeDecoder(draft, verifier, policy=FixedLength(2), early_threshold=0.0)


def test_a_stop_asked_after_a_round_ends_decoding_at_that_round_with_the_partial_output(pair):
    target, _ = pair
    engine = TargetEngine(target, exit_layers=[1], max_batch=2)
    with InProcessVerifier(engine) as verifier:
        decoder = _decoder(pair, verifier)
        full = decoder.generate(REQUEST)
        assert len(full.rounds) > 3  # otherwise stopping after two rounds would prove nothing
        texts: list[str] = []
        with pytest.raises(Cancelled) as err:
            decoder.generate(REQUEST, on_text=texts.append, should_stop=lambda: len(texts) >= 2)
    partial = err.value.partial
    assert len(partial.rounds) == 2  # not one round more than the stop was asked after
    assert partial.stop_reason == "cancelled"
    assert partial.token_ids == full.token_ids[: len(partial.token_ids)]  # what it kept is verified output
    assert 0 < len(partial.token_ids) < len(full.token_ids)
    assert not engine.sessions  # the session was closed on the way out


def test_a_stop_already_asked_submits_nothing_and_closes_the_session(pair):
    target, _ = pair
    engine = TargetEngine(target, exit_layers=[1], max_batch=2)
    with InProcessVerifier(engine) as verifier:
        with pytest.raises(Cancelled) as err:
            _decoder(pair, verifier).generate(REQUEST, should_stop=lambda: True)
    assert err.value.partial.rounds == [] and engine.passes == 0
    assert not engine.sessions


def test_a_stop_is_seen_on_an_early_verdict_before_the_final_one(pair):
    target, _ = pair
    engine = TargetEngine(target, exit_layers=[1], max_batch=2)
    verdicts_seen = []
    with InProcessVerifier(engine) as verifier:
        decoder = _decoder(pair, verifier)
        # True on the second check: the first is before round 0, the second is round 0's EARLY verdict.
        with pytest.raises(Cancelled) as err:
            decoder.generate(REQUEST, should_stop=lambda: verdicts_seen.append(1) or len(verdicts_seen) >= 2)
    assert err.value.partial.rounds == []  # round 0's FINAL verdict was never waited for


def test_the_draft_only_fallback_stops_too(pair):
    with pytest.raises(Cancelled) as err:
        SpeculativeDecoder(pair[1], verifier=None).generate_unverified(REQUEST, should_stop=lambda: True)
    assert err.value.partial.token_ids == [] and not err.value.partial.verified
