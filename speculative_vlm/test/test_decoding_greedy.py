"""Greedy speculative decoding outputs exactly what the target alone would, token for token."""

from __future__ import annotations

import pytest
from hf_reference import hf_greedy
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.policy import AdaptiveLength, FixedLength
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import DraftBlock, GenerationSettings, SessionRequest
from tiny_models import jpeg, noisy_copy, tiny_pair, tiny_vlm, tiny_vlm_text_draft

PROMPTS = [
    "walk to the red ball",
    "turn left slowly and stop near the door",
    "sit down",
    "the blue chair is 3 m ahead, slightly right; go there",
    "back up half a metre",
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    return tiny_pair(seed=3, noise=0.02, arch=request.param)


@pytest.fixture(scope="module")
def llama_pair():
    return tiny_pair(seed=3, noise=0.02)


def speculative(target, draft, request, exit_layers=(), **kwargs):
    with InProcessVerifier(TargetEngine(target, exit_layers=exit_layers)) as verifier:
        return SpeculativeDecoder(draft, verifier, **kwargs).generate(request)


def test_greedy_output_equals_target_generate_on_many_prompts(pair):
    target, draft = pair
    accepted = 0
    for prompt in PROMPTS:
        request = SessionRequest(prompt, settings=GenerationSettings(max_new_tokens=20))
        result = speculative(target, draft, request, preempt=False)
        assert result.token_ids == hf_greedy(target, request), prompt
        accepted += result.accepted
    assert accepted > 0, "the noisy-copy draft should get some tokens accepted, or the accept path is untested"


@pytest.mark.parametrize("length", range(1, 9))
def test_every_draft_length_from_1_to_8_gives_the_target_output(llama_pair, length):
    target, draft = llama_pair
    request = SessionRequest(PROMPTS[1], settings=GenerationSettings(max_new_tokens=18))
    result = speculative(target, draft, request, policy=FixedLength(length), preempt=False)
    assert result.token_ids == hf_greedy(target, request)
    assert result.rounds and all(r.drafted <= length for r in result.rounds)


@pytest.mark.parametrize(
    "preempt, pipeline", [(True, False), (True, True)], ids=["preemption", "preemption+pipelining"]
)
def test_early_exits_with_preemption_do_not_change_output(pair, preempt, pipeline):
    target, draft = pair
    request = SessionRequest(PROMPTS[3], settings=GenerationSettings(max_new_tokens=24))
    # Threshold 0: every early verdict triggers a preemptive block, hits and misses alike.
    result = speculative(
        target, draft, request, exit_layers=[1, 2], preempt=preempt, pipeline=pipeline, early_threshold=0.0
    )
    assert result.token_ids == hf_greedy(target, request)
    assert result.early_hits + result.early_misses > 0
    assert any(r.preemptive for r in result.rounds) or result.early_hits == 0
    if pipeline:
        assert all(r.pipelined == r.preemptive for r in result.rounds)


def test_adaptive_draft_length_gives_the_target_output(pair):
    target, draft = pair
    request = SessionRequest(PROMPTS[0], settings=GenerationSettings(max_new_tokens=24))
    result = speculative(target, draft, request, policy=AdaptiveLength(initial=2), exit_layers=[2])
    assert result.token_ids == hf_greedy(target, request)


def test_vlm_target_with_an_image_and_a_text_only_draft():
    target = tiny_vlm(seed=1)
    request = SessionRequest(PROMPTS[0], image=jpeg(), settings=GenerationSettings(max_new_tokens=16))
    expected = hf_greedy(target, request)
    for draft in (tiny_vlm_text_draft(), noisy_copy(target, noise=0.02)):
        result = speculative(target, draft, request, exit_layers=[1], early_threshold=0.0)
        assert result.token_ids == expected, draft.name


def test_a_draft_prompt_is_what_the_draft_reads_and_the_output_stays_the_targets():
    from speculative_vlm.decoding.drafter import Drafter

    target, draft = tiny_vlm(seed=1), tiny_vlm_text_draft()
    settings = GenerationSettings(max_new_tokens=16)
    request = SessionRequest(PROMPTS[0], image=jpeg(), settings=settings, draft_prompt=PROMPTS[1])
    result = speculative(target, draft, request, exit_layers=[1], early_threshold=0.0)
    assert result.token_ids == hf_greedy(target, SessionRequest(PROMPTS[0], image=jpeg(), settings=settings))
    read = Drafter(draft, request).kv.prompt_len
    assert read == len(draft.encode(SessionRequest(PROMPTS[1], settings=settings)).ids)
    assert read != len(draft.encode(SessionRequest(PROMPTS[0], settings=settings)).ids)


def test_the_image_changes_the_vlm_output():
    target = tiny_vlm(seed=1)
    settings = GenerationSettings(max_new_tokens=8)
    red = hf_greedy(target, SessionRequest(PROMPTS[0], image=jpeg((220, 20, 20)), settings=settings))
    blue = hf_greedy(target, SessionRequest(PROMPTS[0], image=jpeg((20, 20, 220), size=(40, 48)), settings=settings))
    text = hf_greedy(target, SessionRequest(PROMPTS[0], settings=settings))
    assert red != text or blue != text


def test_batched_verify_of_several_sessions_equals_one_by_one(pair):
    target, draft = pair
    blocks = [(PROMPTS[0], (1, 2, 3)), (PROMPTS[1], (5,)), (PROMPTS[3], (9, 8, 7, 6, 5)), (PROMPTS[4], ())]

    def run(batched: bool):
        engine = TargetEngine(target, exit_layers=[1])
        sessions = [engine.open_session(SessionRequest(p)) for p, _ in blocks]
        # First give each session a real accepted prefix, so caches differ in length.
        rounds = []
        for r in range(3):
            items = []
            for s, (_, toks) in zip(sessions, blocks, strict=True):
                ref = list(engine.model.forward([s.kv])[0][-1:].argmax(-1).tolist())
                s.kv.crop(len(s.kv.ids) - 1)
                s.kv.cached = min(s.kv.cached, len(s.kv.ids) - 1)
                tokens = tuple(ref) + toks if r % 2 == 0 else toks
                items.append((s, DraftBlock(r, len(s.output), (), tokens)))
            early = []
            if batched:
                verdicts = engine.verify(items, on_early=lambda s, v, early=early: early.append((s.session_id, v)))
            else:
                verdicts = []
                for item in items:
                    verdicts += engine.verify([item], on_early=lambda s, v, early=early: early.append((s.session_id, v)))
            rounds.append((verdicts, sorted(early, key=lambda e: e[0])))
        return rounds, [s.output for s in sessions]

    batched, one_by_one = run(True), run(False)
    for (vb, eb), (vo, eo) in zip(batched[0], one_by_one[0], strict=True):
        assert [(v.kind, v.accepted, v.token) for v in vb] == [(v.kind, v.accepted, v.token) for v in vo]
        assert [(s, v.accepted, v.token) for s, v in eb] == [(s, v.accepted, v.token) for s, v in eo]
    assert batched[1] == one_by_one[1]


def test_a_block_whose_assumed_prefix_fails_is_dropped_unverified(pair):
    from speculative_vlm.decoding.verifier import VerdictKind

    target, _ = pair
    engine = TargetEngine(target)
    s = engine.open_session(SessionRequest(PROMPTS[0]))
    first = engine.verify([(s, DraftBlock(0, 0, (), (1, 2)))])[0]
    assert first.kind is VerdictKind.FINAL
    stale = DraftBlock(1, len(s.output), (s.output[-1] + 1,), (3, 4))
    wrong_length = DraftBlock(2, len(s.output) + 1, (), (3, 4))
    before = list(s.output)
    assert engine.verify([(s, stale)])[0].kind is VerdictKind.DROPPED
    assert engine.verify([(s, wrong_length)])[0].kind is VerdictKind.DROPPED
    assert s.output == before
