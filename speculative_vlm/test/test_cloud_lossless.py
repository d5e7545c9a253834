"""The engine's lossless guarantees hold over the network: the speculative loop talking to
the cloud server through GrpcVerifier and a delaying, jittering link outputs exactly what
it outputs in-process, with early exits, preemption and pipelining."""

import time

import pytest
import torch
from speculative_vlm.benchmark.netem import DelayProxy, LinkProfile
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.cloud.server import serve
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.policy import FixedLength
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import DraftBlock, GenerationSettings, SessionRequest, VerdictKind
from speculative_vlm.protocol.client import GrpcVerifier
from tiny_models import jpeg, tiny_pair, tiny_vlm, tiny_vlm_text_draft

TOKEN = "lossless-test-token-0123456789abcdef"
PROMPTS = [
    "walk to the red ball",
    "turn left slowly and stop near the door",
    "sit down",
    "the blue chair is 3 m ahead, slightly right; go there",
]
LINK = LinkProfile(delay_s=0.003, jitter_s=0.001)


def hf_greedy(adapter, request: SessionRequest) -> list[int]:
    """The target alone, through Hugging Face's own generate: the reference output."""
    prompt = adapter.encode(request)
    out = adapter.model.generate(
        input_ids=torch.tensor([prompt.ids]), **prompt.extra, max_new_tokens=request.settings.max_new_tokens,
        do_sample=False, eos_token_id=list(adapter.eos_token_ids), pad_token_id=adapter.pad_token_id)
    return out[0, len(prompt.ids):].tolist()


class Cloud:
    """A server for ``target`` behind the delay proxy, and a client through the proxy."""

    def __init__(self, target, exit_layers):
        mp = pytest.MonkeyPatch()
        mp.setenv("SPECULATIVE_VLM_TOKENS", f"robot:{TOKEN}")
        self.server = serve(ServerConfig(bind="127.0.0.1:0", exit_layers=tuple(exit_layers)),
                            engine=TargetEngine(target, exit_layers=exit_layers))
        mp.undo()
        self.proxy = DelayProxy(("127.0.0.1", self.server.port), LINK, seed=7).start()
        self.verifier = GrpcVerifier(self.proxy.address, token=TOKEN)

    def decode(self, draft, request, **kwargs):
        return SpeculativeDecoder(draft, self.verifier, verdict_timeout_s=30, **kwargs).generate(request)

    def dropped_rounds(self) -> float:
        return self.server.metrics.rounds_total.labels("dropped")._value.get()

    def close(self):
        self.verifier.close()
        self.proxy.stop()
        self.server.stop()


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(seed=3, noise=0.02)


@pytest.fixture(scope="module")
def cloud(pair):
    c = Cloud(pair[0], exit_layers=[1, 2])
    yield c
    c.close()


def test_greedy_output_over_grpc_equals_target_generate_on_many_prompts(pair, cloud):
    target, draft = pair
    accepted = 0
    for prompt in PROMPTS:
        request = SessionRequest(prompt, settings=GenerationSettings(max_new_tokens=20))
        result = cloud.decode(draft, request, preempt=False)
        assert result.token_ids == hf_greedy(target, request), prompt
        accepted += result.accepted
    assert accepted > 0


@pytest.mark.parametrize("length", [1, 3, 8])
def test_draft_lengths_over_grpc_give_the_target_output(pair, cloud, length):
    target, draft = pair
    request = SessionRequest(PROMPTS[1], settings=GenerationSettings(max_new_tokens=18))
    result = cloud.decode(draft, request, policy=FixedLength(length), preempt=False)
    assert result.token_ids == hf_greedy(target, request)


def test_early_exits_preemption_and_pipelining_over_grpc_do_not_change_output(pair, cloud):
    target, draft = pair
    request = SessionRequest(PROMPTS[3], settings=GenerationSettings(max_new_tokens=24))
    dropped_before = cloud.dropped_rounds()
    # Threshold 0: every early verdict triggers a pipelined preemptive block, hits and misses alike.
    result = cloud.decode(draft, request, preempt=True, pipeline=True, early_threshold=0.0)
    assert result.token_ids == hf_greedy(target, request)
    assert result.early_hits + result.early_misses > 0
    assert any(r.pipelined for r in result.rounds)
    # Every miss was a block sent ahead on a wrong assumption: the server dropped it unverified.
    assert cloud.dropped_rounds() - dropped_before == result.early_misses


def test_sampling_over_grpc_gives_what_in_process_gives_with_the_same_seed(pair, cloud):
    target, draft = pair
    request = SessionRequest(PROMPTS[0], settings=GenerationSettings(temperature=0.9, top_k=20, max_new_tokens=16,
                                                                    seed=5))
    with InProcessVerifier(TargetEngine(target, exit_layers=[1, 2])) as local:
        expected = SpeculativeDecoder(draft, local, preempt=False).generate(request)
    result = cloud.decode(draft, request, preempt=False)
    assert result.token_ids == expected.token_ids
    assert [r.accepted for r in result.rounds] == [r.accepted for r in expected.rounds]


def test_grammar_constrained_output_over_grpc_equals_in_process(pair, cloud):
    target, draft = pair
    request = SessionRequest(PROMPTS[0], settings=GenerationSettings(max_new_tokens=48, grammar="command"))
    with InProcessVerifier(TargetEngine(target, exit_layers=[1, 2])) as local:
        expected = SpeculativeDecoder(draft, local, preempt=False).generate(request).token_ids
    assert cloud.decode(draft, request, preempt=False).token_ids == expected


def test_a_vlm_target_verifies_a_text_only_draft_for_an_image_over_grpc():
    target = tiny_vlm(seed=1)
    request = SessionRequest(PROMPTS[0], image=jpeg(), settings=GenerationSettings(max_new_tokens=12))
    c = Cloud(target, exit_layers=[1])
    try:
        result = c.decode(tiny_vlm_text_draft(), request, early_threshold=0.0)
        assert result.token_ids == hf_greedy(target, request)
    finally:
        c.close()


def test_the_early_verdict_reaches_the_robot_while_the_later_layers_still_run(pair):
    target, _ = pair
    c = Cloud(target, exit_layers=[1])
    # Make the last decoder layer slow, as the deep layers of a large target are.
    slow = target.decoder_layers[-1].register_forward_hook(lambda *_: time.sleep(0.5))
    try:
        session = c.verifier.open(SessionRequest(PROMPTS[0], settings=GenerationSettings(max_new_tokens=8)))
        sent = time.monotonic()
        session.submit(DraftBlock(round=0, base_length=0, base_tail=(), tokens=(1, 2, 3)))
        early = session.next_verdict(timeout=10)
        early_at = time.monotonic() - sent
        final = session.next_verdict(timeout=10)
        final_at = time.monotonic() - sent
        session.close()
    finally:
        slow.remove()
        c.close()
    assert (early.kind, early.exit_layer, final.kind) == (VerdictKind.EARLY, 1, VerdictKind.FINAL)
    assert final_at - early_at >= 0.25, (early_at, final_at)


def test_cloud_autoregressive_with_the_grammar_streams_every_token_including_forced_ones(pair, cloud):
    target, _ = pair
    request = SessionRequest(PROMPTS[0], settings=GenerationSettings(max_new_tokens=20, grammar="command"))
    engine = TargetEngine(target)
    expected = list(engine.generate(engine.open_session(request)))
    assert cloud.verifier.generate(request) == expected
