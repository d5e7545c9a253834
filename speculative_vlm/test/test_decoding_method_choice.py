"""Per session, speculation or cloud autoregressive streaming: the chooser's decisions on synthetic
measurements, and the auto method's output (either way the target's own) through the in-process
verifier and through gRPC behind the delay proxy, with the choice recorded in the result."""

from __future__ import annotations

import re

import pytest
from speculative_vlm.benchmark.netem import DelayProxy, LinkProfile
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.cloud.server import serve
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import Cancelled, SpeculativeDecoder, StreamingUnavailable
from speculative_vlm.decoding.policy import (
    AUTO,
    CLOUD_AR,
    SPECULATIVE,
    AdaptiveLength,
    FixedLength,
    MethodChooser,
    RoundObservation,
    SessionObservation,
    expected_tokens,
)
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.protocol.client import GrpcVerifier
from tiny_models import noisy_copy, slow_down, target_alone, tiny_causal_lm, tiny_pair

# A command-like session: 39 output tokens, 24 of them decided by the target (the grammar forces
# the rest); drafting 3 ms per token, a pass 40 ms + 5 ms per drafted token, a streamed step 40 ms.
TOKENS, DECIDED, D, V0, V1 = 39, 24, 0.003, 0.040, 0.005


def rounds_at(acceptance: float, gamma: int, rtt: float) -> tuple[RoundObservation, ...]:
    """The rounds of one command at ``acceptance``: as many as its tokens need, their accepted counts
    spread over the truncated geometric distribution (stratified quantiles, so no luck is involved)."""
    count = max(1, round(TOKENS / expected_tokens(acceptance, gamma)))
    v = V0 + V1 * gamma
    rounds = []
    for i in range(count):
        q = (i + 0.5) / count  # P(accepted <= j) = 1 - acceptance^(j + 1) below gamma
        accepted = next((j for j in range(gamma) if 1 - acceptance ** (j + 1) >= q), gamma)
        rounds.append(RoundObservation(gamma, accepted, gamma * D, v, v + rtt))
    return tuple(rounds)


def speculative(acceptance: float, gamma: int, rtt: float) -> SessionObservation:
    return SessionObservation(SPECULATIVE, TOKENS, DECIDED, rtt, rounds=rounds_at(acceptance, gamma, rtt))


def streamed(rtt: float | None, pass_s: float = V0) -> SessionObservation:
    return SessionObservation(CLOUD_AR, TOKENS, DECIDED, open_rtt_s=rtt, stream_pass_s=pass_s)


def chooser_after(acceptance: float, rtt: float, **kwargs) -> MethodChooser:
    """A chooser that has seen speculation at two block lengths and one streamed session on this link."""
    chooser = MethodChooser(**kwargs)
    for gamma in (4, 8, 4, 8):
        chooser.observe(speculative(acceptance, gamma, rtt))
    chooser.observe(streamed(rtt))
    return chooser


def test_the_first_session_speculates_at_the_initial_length_to_measure():
    choice = MethodChooser(initial_gamma=5).choose()
    assert (choice.method, choice.gamma) == (SPECULATIVE, 5)
    assert "no speculative session" in choice.reason


def test_measurements_give_acceptance_drafting_time_and_a_linear_verification_time():
    chooser = chooser_after(0.9, 0.02)
    assert chooser.acceptance == pytest.approx(0.9, abs=0.03)
    assert chooser.draft_per_token_s == pytest.approx(D)
    assert chooser.verify_s(12) == pytest.approx(V0 + 12 * V1, rel=0.01)
    assert chooser.autoregressive_step_s == pytest.approx(V0)
    assert chooser.rtt_s == pytest.approx(0.02)


def test_a_short_round_trip_chooses_speculation():
    choice = chooser_after(0.9, 0.005).choose()
    assert choice.method == SPECULATIVE
    assert choice.speculative_s < 0.9 * choice.cloud_ar_s


def test_a_longer_round_trip_chooses_longer_blocks():
    gammas = [chooser_after(0.97, rtt).choose() for rtt in (0.005, 0.02, 0.06)]
    assert all(c.method == SPECULATIVE for c in gammas)
    assert gammas[0].gamma < gammas[1].gamma < gammas[2].gamma


def test_a_long_round_trip_chooses_cloud_ar():
    choice = chooser_after(0.97, 0.15).choose()
    assert choice.method == CLOUD_AR
    assert choice.speculative_s > 0.9 * choice.cloud_ar_s


def test_the_same_measurements_choose_cloud_ar_at_a_lower_round_trip_when_acceptance_is_lower():
    assert chooser_after(0.9, 0.06).choose().method == CLOUD_AR
    assert chooser_after(0.97, 0.06).choose().method == SPECULATIVE


def test_acceptance_collapse_switches_to_cloud_ar():
    chooser = chooser_after(0.97, 0.02)
    assert chooser.choose().method == SPECULATIVE
    for _ in range(4):  # new prompts the draft gets wrong
        chooser.observe(speculative(0.1, 4, 0.02))
    choice = chooser.choose()
    assert chooser.acceptance < 0.4
    assert choice.method == CLOUD_AR


def test_a_round_trip_measured_while_streaming_brings_speculation_back():
    chooser = chooser_after(0.97, 0.15)
    assert chooser.choose().method == CLOUD_AR
    chooser.observe(streamed(rtt=0.005))  # the link got better
    assert chooser.choose().method == SPECULATIVE


def speculative_opened(rtt: float, open_rtt: float) -> SessionObservation:
    """A speculative session whose rounds saw ``rtt`` and whose open (less the prefill) took ``open_rtt``."""
    return SessionObservation(SPECULATIVE, TOKENS, DECIDED, rtt, open_rtt, rounds_at(0.9, 4, rtt))


def test_a_streamed_session_s_round_trip_loses_the_least_open_set_up_that_speculative_sessions_measured():
    chooser = MethodChooser()
    chooser.observe(speculative_opened(0.020, 0.035))  # the first: not used (it may have connected)
    chooser.observe(speculative_opened(0.020, 0.035))  # 15 ms of set-up
    chooser.observe(speculative_opened(0.020, 0.080))  # a busy moment: the open took longer
    chooser.observe(streamed(rtt=0.165))  # its open took 150 ms of round trip + the same 15 ms of set-up
    assert chooser.rtt_s == pytest.approx(0.150)


def test_the_first_open_s_wait_for_the_connection_does_not_shorten_later_streamed_round_trips():
    # The first open on a new gRPC channel waits for the server's HTTP/2 settings: one one-way delay (60 ms
    # on a 120 ms link). Taken off every streamed open, it made them read 60 ms.
    chooser = MethodChooser()
    chooser.observe(speculative_opened(0.120, 0.120 + 0.060 + 0.005))
    chooser.observe(streamed(rtt=0.125))  # 120 ms of round trip + 5 ms of set-up
    assert chooser.rtt_s == pytest.approx(0.125)


def test_a_verifier_that_cannot_stream_gets_the_best_block_length_instead():
    chooser = chooser_after(0.97, 0.15)
    choice = chooser.choose(can_stream=False)
    assert choice.method == SPECULATIVE
    assert choice.gamma == min(range(1, 17), key=chooser.speculative_s)
    assert "cannot stream" in choice.reason


def test_streaming_long_enough_speculates_once_to_re_measure_the_draft():
    chooser = chooser_after(0.97, 0.15, explore_every=3)  # its last session was streamed
    for _ in range(2):
        assert chooser.choose().method == CLOUD_AR
        chooser.observe(streamed(0.15))
    choice = chooser.choose()  # after 3 streamed sessions in a row
    assert choice.method == SPECULATIVE and "re-measure" in choice.reason
    chooser.observe(speculative(0.97, 8, 0.15))
    assert chooser.choose().method == CLOUD_AR


def test_blocks_never_exceed_the_token_budget():
    chooser = chooser_after(0.97, 0.06)
    assert chooser.choose(can_stream=False).gamma > 5
    choice = chooser.choose(can_stream=False, max_new_tokens=6)
    assert choice.method == SPECULATIVE and choice.gamma <= 5


def test_a_decoder_refuses_cloud_ar_on_a_verifier_that_cannot_stream():
    class SpeculativeOnly:
        def open(self, request):
            raise AssertionError("never opened")

    decoder = SpeculativeDecoder(tiny_causal_lm(seed=1), SpeculativeOnly(), method=CLOUD_AR)
    with pytest.raises(StreamingUnavailable, match="cannot stream"):
        decoder.generate(SessionRequest("go"))


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        SpeculativeDecoder(tiny_causal_lm(seed=1), object(), method="fastest")


def test_a_chosen_length_starts_the_session_and_adaptive_lengths_adapt_from_it():
    assert FixedLength(4).for_session(9).next_length() == 9
    adaptive = AdaptiveLength(initial=4, max_length=8)
    assert adaptive.for_session(12).next_length() == 12 and adaptive.max_length == 12


# ---- through real verifiers -----------------------------------------------------------------------
PROMPTS = ["walk to the red ball", "turn left slowly and stop near the door", "sit down", "go to the blue box"]


def requests() -> list[SessionRequest]:
    return [SessionRequest(p, settings=GenerationSettings(max_new_tokens=24, grammar=g))
            for p in PROMPTS for g in ("command", "")]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(seed=3, noise=0.02)


def test_cloud_ar_in_process_streams_exactly_the_target_output(pair):
    target, draft = pair
    engine = TargetEngine(target)
    with InProcessVerifier(engine) as verifier:
        decoder = SpeculativeDecoder(draft, verifier, method=CLOUD_AR)
        for request in requests():
            result = decoder.generate(request)
            assert result.token_ids == target_alone(engine, request), request
            assert result.method == CLOUD_AR and result.rounds == [] and result.drafted == 0
            # One target pass per token the grammar did not force.
            assert result.target_passes == result.decided
            if request.settings.grammar:
                assert 0 < result.decided < len(result.token_ids)
            else:
                assert result.decided == len(result.token_ids)


def test_a_streamed_session_shows_its_text_as_it_grows_and_stops_on_request_with_the_target_s_prefix(pair):
    target, draft = pair
    engine = TargetEngine(target)
    request = SessionRequest(PROMPTS[0], settings=GenerationSettings(max_new_tokens=24, grammar="command"))
    texts: list[str] = []
    with InProcessVerifier(engine) as verifier:
        decoder = SpeculativeDecoder(draft, verifier, method=CLOUD_AR)
        with pytest.raises(Cancelled) as stopped:
            decoder.generate(request, on_text=texts.append, should_stop=lambda: len(texts) >= 3)
    partial = stopped.value.partial
    assert partial.method == CLOUD_AR and partial.stop_reason == "cancelled"
    assert len(partial.token_ids) == 3 and partial.token_ids == target_alone(engine, request)[:3]
    assert texts == [draft.decode(partial.token_ids[:n]) for n in (1, 2, 3)]


def test_auto_in_process_with_a_slow_draft_switches_to_streaming_and_stays_lossless(pair):
    target, draft = pair
    engine = TargetEngine(target)
    slow = slow_down(noisy_copy(target, noise=0.02), 0.005)  # drafting costs more than the target's passes
    with InProcessVerifier(engine) as verifier:
        decoder = SpeculativeDecoder(slow, verifier, policy=AdaptiveLength(), method=AUTO)
        methods = []
        for request in requests():
            result = decoder.generate(request)
            assert result.token_ids == target_alone(engine, request), request
            methods.append(result.method)
            assert result.summary()["method"] == result.method and result.summary()["choice"]
    assert methods[0] == SPECULATIVE  # nothing measured yet
    assert methods[-1] == CLOUD_AR, methods


def fixed_pass_time(adapter, seconds: float):
    """Make every forward pass of ``adapter`` take ``seconds`` however many tokens it feeds, as a big
    model on a GPU does (a pass's cost barely grows with the block), so long blocks pay."""
    import time

    adapter.decoder_layers[0].register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    return adapter


class Link:
    """The cloud server for ``target`` behind the delay proxy, and the robot's gRPC client."""

    TOKEN = "method-choice-token-0123456789abcdef"

    def __init__(self, target, one_way_s: float):
        mp = pytest.MonkeyPatch()
        mp.setenv("SPECULATIVE_VLM_TOKENS", f"robot:{self.TOKEN}")
        self.engine = TargetEngine(target, exit_layers=[2])
        self.server = serve(ServerConfig(bind="127.0.0.1:0", exit_layers=(2,)), engine=self.engine)
        mp.undo()
        self.proxy = DelayProxy(("127.0.0.1", self.server.port), LinkProfile(delay_s=one_way_s), seed=3).start()
        self.verifier = GrpcVerifier(self.proxy.address, token=self.TOKEN, verdict_timeout_s=30)

    def decode_all(self, draft, count: int) -> tuple[SpeculativeDecoder, list[str]]:
        """Decode ``count`` requests with the auto method; each output must be the target's own."""
        decoder = SpeculativeDecoder(draft, self.verifier, policy=AdaptiveLength(), method=AUTO, verdict_timeout_s=30)
        methods = []
        for request in requests()[:count]:
            result = decoder.generate(request)
            assert result.token_ids == target_alone(self.engine, request), (request, result.choice)
            methods.append(result.method)
        return decoder, methods

    def close(self) -> None:
        self.verifier.close()
        self.proxy.stop()
        self.server.stop()


def test_auto_over_grpc_through_a_slow_link_measures_the_round_trip_and_streams_losslessly(pair):
    target, draft = pair
    link = Link(target, one_way_s=0.06)
    try:
        decoder, methods = link.decode_all(draft, 5)
    finally:
        link.close()
    assert methods[0] == SPECULATIVE and methods[1:] == [CLOUD_AR] * 4, methods
    # Measured on streamed sessions too: the proxy's 120 ms, not loopback's ~0, and not 60 ms (the first open
    # waited for the new channel's HTTP/2 settings, one one-way delay, and that was once taken off every later
    # open). A streamed open's round trip is never shorter than the link's; what it holds on top is the open's
    # set-up (threads, authentication): a few ms on a quiet machine, more under load.
    assert 0.9 * 0.12 <= decoder.chooser.rtt_s <= 1.5 * 0.12, decoder.chooser.rtt_s
    assert re.search(r"RTT \d+ ms", decoder.last_choice.reason), decoder.last_choice.reason  # e.g. "RTT 121 ms"


def test_auto_over_grpc_through_a_fast_link_to_a_slow_target_keeps_speculating_losslessly(pair):
    target, _ = pair
    exact = noisy_copy(target, noise=0.0)  # a draft that always agrees: every block is accepted whole
    link = Link(fixed_pass_time(tiny_causal_lm("llama", seed=3), 0.05), one_way_s=0.002)
    try:
        decoder, methods = link.decode_all(exact, 4)
    finally:
        link.close()
    assert methods == [SPECULATIVE] * 4, [decoder.last_choice]
    assert decoder.chooser.rtt_s < 0.03 and decoder.last_choice.gamma > 1
