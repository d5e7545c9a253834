"""The in-process verifier serves several concurrent sessions, batching their blocks."""

from __future__ import annotations

import threading

import pytest
from hf_reference import hf_greedy
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from tiny_models import noisy_copy, tiny_causal_lm

PROMPTS = ["walk to the red ball", "sit down", "turn right and stop at the wall", "stand up"]


def test_concurrent_sessions_get_their_own_target_output_and_share_passes():
    target = tiny_causal_lm("qwen2", seed=13)
    draft = noisy_copy(target, noise=0.02)
    requests = [SessionRequest(p, settings=GenerationSettings(max_new_tokens=20)) for p in PROMPTS]
    engine = TargetEngine(target, exit_layers=[1], max_batch=4)
    results: dict[int, list[int]] = {}
    with InProcessVerifier(engine) as verifier:
        decoder = SpeculativeDecoder(draft, verifier, early_threshold=0.0)

        def run(i: int) -> None:
            results[i] = decoder.generate(requests[i]).token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    for i, request in enumerate(requests):
        assert results[i] == hf_greedy(target, request), PROMPTS[i]
    assert engine.largest_batch > 1
    assert not engine.sessions  # every session was closed


def test_an_invalid_block_fails_its_own_session_only():
    from speculative_vlm.decoding.verifier import DraftBlock, Refused, VerdictKind

    target = tiny_causal_lm("qwen2", seed=13, layers=2)
    engine = TargetEngine(target, max_batch=4)
    with InProcessVerifier(engine) as verifier:
        good, bad = verifier.open(SessionRequest("sit down")), verifier.open(SessionRequest("stand up"))
        bad.submit(DraftBlock(0, 0, (), (target.vocab_size + 5,)))
        good.submit(DraftBlock(0, 0, (), (1, 2)))
        assert good.next_verdict(timeout=30).kind is VerdictKind.FINAL
        with pytest.raises(Refused) as err:
            bad.next_verdict(timeout=30)
        assert err.value.code == "invalid_argument" and "draft.tokens[0]" in err.value.reason


def test_a_block_sent_once_the_verification_thread_died_is_refused_at_once_as_by_the_server():
    from speculative_vlm.decoding.verifier import DraftBlock, Refused, VerifierTimeout

    target = tiny_causal_lm("qwen2", seed=13, layers=2)
    with InProcessVerifier(TargetEngine(target, max_batch=4)) as verifier:
        first, second = verifier.open(SessionRequest("sit down")), verifier.open(SessionRequest("stand up"))

        def broken() -> list:
            raise RuntimeError("scheduler bug")

        verifier.scheduler._ready = broken  # the thread's next wake-up raises out of its loop
        first.submit(DraftBlock(0, 0, (), (1, 2)))  # wakes the thread, which dies: this verdict never comes
        with pytest.raises(VerifierTimeout):
            first.next_verdict(timeout=2)
        assert verifier.scheduler.broken and "scheduler bug" in verifier.scheduler.broken
        second.submit(DraftBlock(0, 0, (), (1, 2)))
        with pytest.raises(Refused) as err:
            second.next_verdict(timeout=2)
        assert err.value.code == "verify_failed" and "cannot verify any more" in err.value.reason
