"""Every bad request gets an Error with a reason on its own stream, and the server keeps
serving everyone else: each test runs while a healthy robot decodes concurrently."""

import socket
import threading
import time

import grpc
import pytest
from cloud_harness import serving
from speculative_vlm.cloud.config import ServerConfig, ServerLimits
from speculative_vlm.cloud.server import serve
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    GenerationSettings,
    ImageNotSupported,
    Refused,
    SessionNotFound,
    SessionRequest,
)
from speculative_vlm.protocol import convert
from speculative_vlm.protocol import verifier_pb2 as pb
from speculative_vlm.protocol.client import METHOD, GrpcVerifier
from tiny_models import jpeg, target_alone

HEALTHY, INTRUDER = "healthy-robot-token-000000000000", "intruder-robot-token-11111111111"
HEALTHY_REQUEST = SessionRequest(prompt="walk to the red ball", settings=GenerationSettings(max_new_tokens=32))
REQUEST = SessionRequest(prompt="turn left", settings=GenerationSettings(max_new_tokens=8))
LIMITS = ServerLimits(max_message_bytes=256 * 1024, max_image_bytes=32 * 1024, max_prompt_chars=200,
                max_sessions_per_client=2, requests_per_second=1000, burst=1000)


@pytest.fixture(scope="module")
def expected(models):
    return target_alone(TargetEngine(models[0]), HEALTHY_REQUEST)


@pytest.fixture(scope="module")
def server(models):
    config = ServerConfig(bind="127.0.0.1:0", session_idle_s=1.0, limits=LIMITS, max_wait_ms=2)
    engine = TargetEngine(models[0], exit_layers=[2])
    with serving(config, engine, tokens=f"healthy:{HEALTHY},intruder:{INTRUDER}") as handle:
        yield handle


@pytest.fixture
def healthy_robot(server, models, expected):
    """A robot decoding through the whole test; it must finish with the target's output."""
    result: dict = {}

    def decode():
        verifier = GrpcVerifier(f"127.0.0.1:{server.port}", token=HEALTHY)
        try:
            # Pacing keeps it busy for the whole test, like a robot drafting on a slow CPU.
            decoder = SpeculativeDecoder(models[1], verifier, verdict_timeout_s=30)
            original = decoder._draft_block

            def slow_draft(*args, **kwargs):
                time.sleep(0.02)
                return original(*args, **kwargs)
            decoder._draft_block = slow_draft
            result["tokens"] = decoder.generate(HEALTHY_REQUEST).token_ids
        except BaseException as exc:
            result["error"] = exc
        finally:
            verifier.close()

    thread = threading.Thread(target=decode)
    thread.start()
    yield
    thread.join(timeout=60)
    assert "error" not in result, result.get("error")
    assert result["tokens"] == expected


_clients: list[GrpcVerifier] = []


def _intruder(server, **kwargs) -> GrpcVerifier:
    _clients.append(GrpcVerifier(f"127.0.0.1:{server.port}", token=INTRUDER, **kwargs))
    return _clients[-1]


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _clients:
        _clients.pop().close()


def _raw_stream(server, payloads: list[bytes]) -> list[pb.ServerMessage]:
    """Send raw bytes as stream messages (as a broken or hostile client would)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=lambda b: b,
                                     response_deserializer=pb.ServerMessage.FromString)
        replies: list[pb.ServerMessage] = []
        try:
            for reply in call(iter(payloads), metadata=(("authorization", f"Bearer {INTRUDER}"),), timeout=10):
                replies.append(reply)
        except grpc.RpcError:  # a refused stream ends with its gRPC status (test_cloud_status_codes)
            pass
        return replies


def test_an_oversized_image_is_refused(server, healthy_robot):
    big = jpeg(size=(400, 400)) + b"\0" * (40 * 1024)
    with pytest.raises(Refused) as refused:
        _intruder(server).open(SessionRequest(prompt="what is this", image=big))
    assert refused.value.code == "image_too_large" and "limit" in refused.value.reason


def test_an_image_that_does_not_decode_is_refused(server, healthy_robot):
    with pytest.raises(ImageNotSupported) as refused:
        _intruder(server).open(SessionRequest(prompt="what is this", image=b"\xff\xd8\xff\xe0 not a jpeg"))
    assert refused.value.code == "bad_image"


def test_a_message_over_the_size_limit_is_refused(server, healthy_robot):
    with pytest.raises(Refused) as refused:
        _intruder(server).open(SessionRequest(prompt="x", image=b"\0" * (300 * 1024)))
    assert refused.value.code == "resource_exhausted" and "larger than max" in refused.value.reason


def test_a_prompt_over_the_length_limit_is_refused(server, healthy_robot):
    with pytest.raises(Refused) as refused:
        _intruder(server).open(SessionRequest(prompt="go " * 100))
    assert refused.value.code == "prompt_too_long"


def test_garbage_bytes_on_the_stream_get_an_error(server, healthy_robot):
    replies = _raw_stream(server, [b"\xff\xff\xff\xff garbage"])
    assert [r.error.code for r in replies] == ["malformed"]
    assert "ClientMessage" in replies[0].error.reason


def test_garbage_bytes_on_the_port_do_not_disturb_the_server(server, healthy_robot):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 8)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass


def test_a_draft_for_a_session_never_opened_gets_an_error(server, healthy_robot):
    draft = convert.draft_to_pb(DraftBlock(round=0, base_length=0, base_tail=(), tokens=(1, 2)))
    replies = _raw_stream(server, [draft.SerializeToString()])
    assert [r.error.code for r in replies] == ["no_session"]
    assert "send Open first" in replies[0].error.reason


def test_a_session_idle_past_the_expiry_is_ended_with_a_reason(server, healthy_robot):
    session = _intruder(server).open(REQUEST)
    time.sleep(1.6)
    with pytest.raises(SessionNotFound, match="expired after 1 s idle"):
        session.submit(DraftBlock(round=0, base_length=0, base_tail=(), tokens=(1,)))
        session.next_verdict(timeout=5)


def test_sessions_beyond_the_per_client_limit_are_refused(server, healthy_robot):
    verifier = _intruder(server)
    held = [verifier.open(REQUEST) for _ in range(LIMITS.max_sessions_per_client)]
    with pytest.raises(Refused) as refused:
        verifier.open(REQUEST)
    assert refused.value.code == "too_many_sessions"
    for session in held:
        session.close()


def test_a_client_over_its_request_rate_is_refused(models):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPECULATIVE_VLM_TOKENS", f"intruder:{INTRUDER}")
    handle = serve(ServerConfig(bind="127.0.0.1:0", limits=ServerLimits(requests_per_second=1, burst=2)),
                   engine=TargetEngine(models[0]))
    mp.undo()
    try:
        session = _intruder(handle).open(REQUEST)  # 1 of the burst of 2
        session.submit(DraftBlock(round=0, base_length=0, base_tail=(), tokens=(1,)))  # 2
        session.next_verdict(timeout=10)
        session.submit(DraftBlock(round=1, base_length=2, base_tail=(), tokens=(1,)))  # over the rate
        with pytest.raises(Refused) as refused:
            session.next_verdict(timeout=10)
        assert refused.value.code == "rate_limited" and "requests/s" in refused.value.reason
    finally:
        handle.stop()


def test_a_stream_that_never_opens_a_session_is_ended_after_the_idle_time(server, healthy_robot):
    started = time.monotonic()
    replies = _raw_stream(server, _silent_for(5.0))
    assert [r.error.code for r in replies] == ["open_timeout"]
    assert time.monotonic() - started < 3.0


def _silent_for(seconds: float):
    """A request stream that sends nothing for a while (a client that connected and stalled)."""
    time.sleep(seconds)
    yield from ()
