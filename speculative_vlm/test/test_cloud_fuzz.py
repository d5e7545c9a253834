"""No protocol message can harm another session or the server: a bounded fuzz (hypothesis over
every field of Open and Draft, in any order, with garbage between) on one stream while a
healthy robot decodes on another; the robot's every output must equal the target's own."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from cloud_harness import serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polling import wait_for
from speculative_vlm.cloud.config import ServerConfig, ServerLimits
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.protocol import verifier_pb2 as pb
from speculative_vlm.protocol.client import METHOD, GrpcVerifier
from tiny_models import VOCAB, target_alone

HEALTHY, FUZZER = "healthy-robot-token-000000000000", "fuzzing-client-token-1111111111"
REQUEST = SessionRequest("walk to the red ball", settings=GenerationSettings(max_new_tokens=16))
# A message that means the target failed, not that the request was refused: no client input may cause one.
INTERNAL_FAILURES = {"verify_failed", "open_failed", "generate_failed"}

u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
f64 = st.floats(allow_nan=True, allow_infinity=True)
token_id = st.one_of(st.integers(0, 300), st.integers(VOCAB - 2, VOCAB + 2), u32)


def messages(cls, plausible: dict, anything: dict) -> st.SearchStrategy:
    """Messages of ``cls``: plausible ones, (most often) plausible ones with one field set to anything
    its wire type can carry, so that each check is reached on its own, and ones with every field anything."""
    fields = sorted(plausible)
    one_off = st.tuples(st.fixed_dictionaries(plausible), st.sampled_from(fields), st.fixed_dictionaries(anything))
    one_off = one_off.map(lambda t: {**t[0], t[1]: t[2][t[1]]})
    return st.one_of(st.fixed_dictionaries(plausible), one_off, one_off, st.fixed_dictionaries(anything)).map(
        lambda kwargs: cls(**kwargs))


generation_settings = messages(pb.GenerationSettings, {
    "temperature": st.sampled_from([0.0, 0.7, 1.0]),
    "top_k": st.integers(0, 50),
    "top_p": st.floats(0.125, 1, width=32),
    "max_new_tokens": st.integers(0, 24),
    "grammar": st.just(""),
    "seed": st.integers(0, 2**64 - 1),
}, {
    "temperature": f32,
    "top_k": i32,
    "top_p": f32,
    "max_new_tokens": i32,
    "grammar": st.one_of(st.sampled_from(["command", "no-such-grammar"]), st.text(max_size=8)),
    "seed": st.integers(0, 2**64 - 1),
})
opens = messages(pb.Open, {
    "protocol_version": st.just(1),
    "image_jpeg": st.just(b""),
    "system": st.text(max_size=24),
    "prompt": st.sampled_from(["walk to the red ball", "sit"]),
    "settings": generation_settings,
    "mode": st.sampled_from([pb.SPECULATIVE, pb.SPECULATIVE, pb.AUTOREGRESSIVE]),
}, {
    "protocol_version": u32,
    "image_jpeg": st.binary(max_size=48),
    "system": st.text(max_size=24),
    "prompt": st.text(max_size=40),
    "settings": generation_settings,
    "mode": st.integers(0, 9),
})
distributions = st.builds(pb.SparseDistribution, token_ids=st.lists(token_id, max_size=4),
                          probs=st.lists(st.one_of(st.floats(0, 0.3), f64), max_size=4))
drafts = messages(pb.Draft, {
    "round": st.integers(0, 6),
    "base_length": st.sampled_from([0, 0, 1, 3]),
    "base_tail": st.just([]),
    "tokens": st.lists(st.integers(0, 300), max_size=6),
    "preemptive": st.booleans(),
    "q": st.just([]),
}, {
    "round": u32,
    "base_length": u32,
    "base_tail": st.lists(token_id, max_size=3),
    "tokens": st.lists(token_id, max_size=40),
    "preemptive": st.booleans(),
    "q": st.lists(distributions, max_size=8),
})
payloads = st.one_of(
    opens.map(lambda m: pb.ClientMessage(open=m).SerializeToString()),
    drafts.map(lambda m: pb.ClientMessage(draft=m).SerializeToString()),
    st.binary(max_size=24),  # garbage
)
# Mostly a plausible order (Open, then drafts), sometimes anything; always ends with Close.
conversations = st.one_of(
    st.tuples(opens.map(lambda m: pb.ClientMessage(open=m).SerializeToString()),
              st.lists(drafts.map(lambda m: pb.ClientMessage(draft=m).SerializeToString()), min_size=1,
                       max_size=3)).map(
        lambda t: [t[0], *t[1]]),
    st.lists(payloads, max_size=4),
)
CLOSE = pb.ClientMessage(close=pb.Close()).SerializeToString()
# Replies that answer one message (Open, Draft, garbage); the fuzzer waits for one before the next.
ANSWERS = {"opened", "final", "dropped", "error"}


@pytest.fixture(scope="module")
def server(models):
    config = ServerConfig(bind="127.0.0.1:0", max_batch=4, max_wait_ms=5, exit_layers=(1,),
                          limits=ServerLimits(requests_per_second=10_000, burst=10_000))
    engine = TargetEngine(models[0], exit_layers=[1], max_batch=4)
    with serving(config, engine, tokens=f"healthy:{HEALTHY},fuzzer:{FUZZER}") as handle:
        yield handle


class HealthyRobot:
    """Decodes the same request again and again until stopped; keeps every output."""

    def __init__(self, models, port: int):
        self.outputs: list[object] = []
        self._stop = threading.Event()
        self._verifier = GrpcVerifier(f"127.0.0.1:{port}", token=HEALTHY)
        self._decoder = SpeculativeDecoder(models[1], self._verifier, verdict_timeout_s=30)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.outputs.append(self._decoder.generate(REQUEST).token_ids)
            except Exception as exc:  # judged by the test
                self.outputs.append(exc)
            time.sleep(0.01)

    def start(self) -> HealthyRobot:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._verifier.close()


def test_no_protocol_message_harms_another_session_or_the_server(models, server):
    expected = target_alone(TargetEngine(models[0]), REQUEST)
    robot = HealthyRobot(models, server.port).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    call = channel.stream_stream(METHOD, request_serializer=lambda b: b,
                                 response_deserializer=pb.ServerMessage.FromString)
    probe = GrpcVerifier(f"127.0.0.1:{server.port}", token=HEALTHY)
    started = time.monotonic()

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(conversation=conversations)
    def one_stream(conversation: list[bytes]) -> None:
        replies: list[pb.ServerMessage] = []
        status = grpc.StatusCode.OK
        answered = threading.Semaphore(0)

        def requests():
            for payload in conversation:
                yield payload
                answered.acquire(timeout=2.0)  # let the server verify a draft before the next, or Close
            yield CLOSE

        try:
            for reply in call(requests(), metadata=(("authorization", f"Bearer {FUZZER}"),), timeout=15):
                replies.append(reply)
                if reply.WhichOneof("kind") in ANSWERS:
                    answered.release()
        except grpc.RpcError as exc:  # a refusal may end the stream with its status
            status = exc.code()
        assert status is not grpc.StatusCode.DEADLINE_EXCEEDED, "the server left a stream hanging"
        errors = [r.error.code for r in replies if r.WhichOneof("kind") == "error"]
        assert not set(errors) & INTERNAL_FAILURES, (errors, replies[-1])
        assert not errors or replies[-1].WhichOneof("kind") == "error", "messages followed an Error"
        assert server.service.scheduler._thread.is_alive()
        assert probe.serving(), "the server stopped serving"

    try:
        one_stream()
    finally:
        robot.stop()
        probe.close()
        channel.close()
    elapsed = time.monotonic() - started
    assert robot.outputs, "the healthy robot never finished a decode"
    assert all(out == expected for out in robot.outputs), [o for o in robot.outputs if o != expected][:1]
    wait_for(lambda: not server.service.engine.sessions, 10, step=0.05)
    assert not server.service.engine.sessions, "sessions were left open on the target"
    print(f"\nfuzz: 150 streams in {elapsed:.1f} s; the healthy robot decoded {len(robot.outputs)} times, "
          "every output equal to the target alone")
