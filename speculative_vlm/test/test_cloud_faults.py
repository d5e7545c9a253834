"""Link and server faults: the robot learns of them within its deadlines, through typed
errors and the link state, never by hanging; and it recovers when the cloud is back."""

import signal
import socket
import sys
import threading
import time

import pytest
from cloud_harness import start_server_command
from speculative_vlm.benchmark.netem import DelayProxy, LinkProfile
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.cloud.server import serve
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    GenerationSettings,
    LinkLost,
    SessionRequest,
    VerdictKind,
    VerifierTimeout,
)
from speculative_vlm.protocol.client import GrpcVerifier
from speculative_vlm.protocol.link import LinkState
from tiny_models import target_alone

TOKEN = "faults-test-token-0123456789abcdef"
REQUEST = SessionRequest(prompt="walk to the red ball", settings=GenerationSettings(max_new_tokens=16))
BLOCK = DraftBlock(round=0, base_length=0, base_tail=(), tokens=(1, 2, 3))


@pytest.fixture(scope="module")
def expected(models):
    return target_alone(TargetEngine(models[0]), REQUEST)


@pytest.fixture
def tokens_env(monkeypatch):
    monkeypatch.setenv("SPECULATIVE_VLM_TOKENS", f"robot:{TOKEN}")


def _final(session, timeout=10.0):
    while (verdict := session.next_verdict(timeout=timeout)).kind is VerdictKind.EARLY:
        pass
    return verdict


def _decode(models, verifier) -> list[int]:
    return SpeculativeDecoder(models[1], verifier, verdict_timeout_s=30).generate(REQUEST).token_ids


def test_a_killed_server_process_is_reported_lost_within_the_deadline(models, tmp_path):
    model_dir = tmp_path / "tiny-target"
    models[0].model.save_pretrained(model_dir)
    models[0].tokenizer.save_pretrained(model_dir)
    server = start_server_command(
        [sys.executable, "-m", "speculative_vlm.cloud.server", "--model", str(model_dir), "--bind", "127.0.0.1:0",
         "--torch-threads", "1"], tokens=f"robot:{TOKEN}")
    proc = server.proc
    try:
        verifier = GrpcVerifier(f"127.0.0.1:{server.port}", token=TOKEN, verdict_timeout_s=5)
        states = []
        verifier.add_link_listener(lambda state, reason: states.append(state))
        session = verifier.open(REQUEST)
        session.submit(BLOCK)
        _final(session)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(LinkLost):
            session.submit(DraftBlock(round=1, base_length=99, base_tail=(), tokens=(1,)))
            _final(session, timeout=5)
        assert time.monotonic() - killed < 5
        assert verifier.link_state is LinkState.LOST and LinkState.LOST in states
        verifier.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_restarted_server_serves_a_new_session_from_the_same_client(models, expected, tokens_env):
    first = serve(ServerConfig(bind="127.0.0.1:0"), engine=TargetEngine(models[0]))
    port = first.port
    verifier = GrpcVerifier(f"127.0.0.1:{port}", token=TOKEN, open_timeout_s=20)
    session = verifier.open(REQUEST)
    first.stop(grace=0)
    with pytest.raises(LinkLost):
        session.submit(BLOCK)
        _final(session, timeout=5)
    second = serve(ServerConfig(bind=f"127.0.0.1:{port}"), engine=TargetEngine(models[0]))
    try:
        assert _decode(models, verifier) == expected
        assert verifier.link_state is LinkState.CONNECTED
    finally:
        verifier.close()
        second.stop()


def test_a_connection_dropped_mid_stream_raises_link_lost_and_a_new_session_works(models, expected, tokens_env):
    handle = serve(ServerConfig(bind="127.0.0.1:0"), engine=TargetEngine(models[0]))
    proxy = DelayProxy(("127.0.0.1", handle.port), LinkProfile(delay_s=0.002)).start()
    try:
        verifier = GrpcVerifier(proxy.address, token=TOKEN)
        session = verifier.open(REQUEST)
        session.submit(BLOCK)
        _final(session)
        assert proxy.drop_connections() >= 1
        started = time.monotonic()
        with pytest.raises(LinkLost):
            session.submit(DraftBlock(round=1, base_length=99, base_tail=(), tokens=(1,)))
            _final(session, timeout=5)
        assert time.monotonic() - started < 5
        assert _decode(models, verifier) == expected
        verifier.close()
    finally:
        proxy.stop()
        handle.stop()


def test_a_stalled_link_times_out_at_the_deadline_and_marks_the_link_degraded(models, tokens_env):
    handle = serve(ServerConfig(bind="127.0.0.1:0"), engine=TargetEngine(models[0]))
    proxy = DelayProxy(("127.0.0.1", handle.port)).start()
    try:
        verifier = GrpcVerifier(proxy.address, token=TOKEN, keepalive_s=30)
        session = verifier.open(REQUEST)
        session.submit(BLOCK)
        _final(session)
        assert verifier.link_state is LinkState.CONNECTED
        proxy.profile.delay_s = 3.0  # the link stalls: packets now take 3 s each way
        session.submit(DraftBlock(round=1, base_length=99, base_tail=(), tokens=(1,)))
        started = time.monotonic()
        with pytest.raises(VerifierTimeout):
            session.next_verdict(timeout=0.5)
        assert 0.4 < time.monotonic() - started < 2.0
        assert verifier.link_state is LinkState.DEGRADED
        verifier.close()
    finally:
        proxy.stop()
        handle.stop()


def test_open_gives_up_with_link_lost_when_nothing_listens():
    verifier = GrpcVerifier("127.0.0.1:9", token=TOKEN, open_timeout_s=1.0, backoff_initial_s=0.05)
    assert not verifier.serving(timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(LinkLost, match="could not open"):
        verifier.open(REQUEST)
    assert time.monotonic() - started < 3.0
    assert verifier.link_state is LinkState.LOST
    verifier.close()


def test_open_retries_with_back_off_until_a_server_comes_up(models, expected, tokens_env):
    with socket.socket() as probe:  # a port nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    verifier = GrpcVerifier(f"127.0.0.1:{port}", token=TOKEN, open_timeout_s=20, backoff_initial_s=0.1,
                            backoff_max_s=0.5)
    states = []
    verifier.add_link_listener(lambda state, reason: states.append(state))
    result: dict = {}
    opener = threading.Thread(target=lambda: result.update(session=verifier.open(REQUEST)))
    opener.start()
    time.sleep(1.0)
    assert opener.is_alive(), "open() should still be retrying"
    handle = serve(ServerConfig(bind=f"127.0.0.1:{port}"), engine=TargetEngine(models[0]))
    try:
        opener.join(timeout=15)
        assert result["session"].session_id
        result["session"].close()
        assert states[:1] == [LinkState.LOST] and states[-1] is LinkState.CONNECTED
        assert _decode(models, verifier) == expected
    finally:
        verifier.close()
        handle.stop()
