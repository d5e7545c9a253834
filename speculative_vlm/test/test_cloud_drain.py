"""Restarts robots do not notice, on the server's side: on SIGTERM the verifier drains.

Health turns NOT_SERVING at once, new sessions are refused with ``draining`` (gRPC UNAVAILABLE),
the blocks already in flight get their verdicts, every session is then ended with ``draining``,
and the process exits within its drain deadline. The client maps ``draining`` to
:class:`Draining`, a retryable :class:`LinkLost`, and moves on to its next address when it has one.
The server-process tests run the real ``speculative-vlm-cloud`` ``main()`` (signals included) on a
tiny target whose verification passes are slowed, so a block is surely in flight when the signal
comes. Real gRPC on loopback throughout.
"""

from __future__ import annotations

import random
import signal
import time

import grpc
import pytest
from cloud_harness import open_message, raw_stream, start_server_script
from grpc_health.v1 import health_pb2, health_pb2_grpc
from polling import wait_until
from speculative_vlm.cloud.config import ConfigError, ServerConfig
from speculative_vlm.cloud.server import serve
from speculative_vlm.cloud.service import SERVICE_NAME
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.retry import Backoff, retryable
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    Draining,
    GenerationSettings,
    InvalidArgument,
    LinkLost,
    Refused,
    SessionNotFound,
    SessionRequest,
    VerdictKind,
    VerifierTimeout,
)
from speculative_vlm.protocol import errors
from speculative_vlm.protocol.client import GrpcVerifier
from tiny_models import target_alone, tiny_pair

REQUEST = SessionRequest(prompt="walk to the red ball", settings=GenerationSettings(max_new_tokens=12))
S = grpc.StatusCode
SECONDS_PER_PASS = 1.5  # each verification pass of the server process


# ---- the table and the client's typed error -----------------------------------------------------
def test_draining_is_a_retryable_code_that_ends_the_stream_unavailable_and_raises_draining():
    kind = errors.ERRORS["draining"]
    assert kind.status is S.UNAVAILABLE and kind.retryable
    from_message = errors.exception_for("draining", "restarting")
    from_status = errors.exception_for_status(S.UNAVAILABLE, "restarting", "draining")
    for error in (from_message, from_status):
        assert isinstance(error, Draining) and isinstance(error, LinkLost) and "restarting" in str(error)
        assert retryable(error)


def test_exactly_the_codes_that_end_a_stream_unavailable_are_retryable():
    for kind in errors.ERRORS.values():
        assert kind.retryable == (kind.status is S.UNAVAILABLE), kind.code
    assert {k.code for k in errors.ERRORS.values() if k.retryable} >= {"draining", "server_shutdown", "replica_lost"}


def test_a_lost_link_a_vanished_session_or_a_missing_verdict_is_retried_and_a_refusal_is_not():
    for error in (LinkLost("gone"), Draining("draining: restart"), SessionNotFound("expired"), VerifierTimeout("slow")):
        assert retryable(error), error
    for error in (Refused("rate_limited", "slow down"), InvalidArgument("invalid_argument", "bad"),
                  ValueError("not a verifier error")):
        assert not retryable(error), error


def test_backoff_doubles_up_to_its_ceiling_and_jitters_down_by_at_most_half():
    backoff = Backoff(initial_s=0.2, max_s=1.0, jitter=0.5, rng=random.Random(3))
    for retry, scheduled in ((1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (30, 1.0), (10_000, 1.0)):
        delays = [backoff.delay(retry) for _ in range(200)]
        assert all(scheduled / 2 <= d <= scheduled for d in delays), retry
        assert max(delays) - min(delays) > scheduled / 4  # spread out, not in lockstep
    assert Backoff(0.2, 1.0, jitter=0.0).delay(2) == 0.4
    for bad in (dict(initial_s=-1.0), dict(initial_s=2.0, max_s=1.0), dict(jitter=1.5)):
        with pytest.raises(ValueError):
            Backoff(**bad)
    with pytest.raises(ValueError):
        backoff.delay(0)


def test_a_negative_drain_timeout_is_refused():
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        ServerConfig(drain_timeout_s=-1.0).validate()


# ---- an in-process server that drains ----------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return tiny_pair(seed=9, noise=0.02, draft_seed=4)


def _serve(target) -> object:
    return serve(ServerConfig(bind="127.0.0.1:0", require_auth=False, max_wait_ms=1.0),
                 engine=TargetEngine(target, exit_layers=[2]))


def test_a_draining_server_reports_not_serving_and_refuses_a_new_session_with_draining(models):
    handle = _serve(models[0])
    address = f"127.0.0.1:{handle.port}"
    verifier = GrpcVerifier(address, open_timeout_s=0.5)
    try:
        assert verifier.serving()
        handle.drain(timeout_s=1.0)  # nothing in flight: returns at once; the port stays open until stop()
        assert not verifier.serving()
        end = raw_stream(address, [open_message(REQUEST)])
        assert [r.error.code for r in end.replies] == ["draining"]
        assert end.status is S.UNAVAILABLE and end.code == "draining" and "reopen" in end.details.lower()
        with pytest.raises(Draining, match="draining"):
            verifier.open(REQUEST)
    finally:
        verifier.close()
        handle.stop(grace=0.0)


def test_open_moves_on_to_the_next_address_when_the_first_drains_and_decodes_losslessly(models):
    target, draft = models
    first, second = _serve(target), _serve(target)
    verifier = GrpcVerifier([f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"], open_timeout_s=5.0)
    try:
        decoder = SpeculativeDecoder(draft, verifier, verdict_timeout_s=10.0)
        expected = target_alone(TargetEngine(target), REQUEST)
        assert decoder.generate(REQUEST).token_ids == expected
        assert verifier.address.endswith(f":{first.port}")
        first.drain(timeout_s=1.0)
        assert decoder.generate(REQUEST).token_ids == expected  # on the second server
        assert verifier.address.endswith(f":{second.port}")
        assert second.service.scheduler.passes > 0
    finally:
        verifier.close()
        first.stop(grace=0.0)
        second.stop(grace=0.0)


# ---- the real process, SIGTERM ------------------------------------------------------------------
@pytest.fixture(scope="module")
def target_dir(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("drain") / "target"
    models[0].model.save_pretrained(folder)
    models[0].tokenizer.save_pretrained(folder)
    return folder


def _start(target_dir, drain_timeout_s: float):
    return start_server_script("slow_pass_cloud_server.py", str(SECONDS_PER_PASS), "--model", str(target_dir),
                               "--bind", "127.0.0.1:0", "--no-auth", "--exit-layers", "2", "--max-wait-ms", "1",
                               "--drain-timeout-s", str(drain_timeout_s))


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2).status


def _event(server, name: str) -> dict:
    """The server's JSON log line for ``name`` (its reader thread may be a moment behind the exit)."""
    wait_until(lambda: server.event(name) is not None, 5, f"{name!r} in the server's log")
    return server.event(name)


def _first_block(verifier: GrpcVerifier) -> tuple[object, DraftBlock]:
    """An open session and the first block its draft would send."""
    session = verifier.open(REQUEST)
    return session, DraftBlock(round=0, base_length=0, base_tail=(), tokens=(5, 6, 7))


def test_sigterm_answers_the_block_in_flight_refuses_new_sessions_ends_the_rest_with_draining_and_exits(
        target_dir, models):
    server = _start(target_dir, drain_timeout_s=10.0)
    address = f"127.0.0.1:{server.port}"
    verifier = GrpcVerifier(address, open_timeout_s=10.0, verdict_timeout_s=10.0)
    try:
        busy, block = _first_block(verifier)
        idle = verifier.open(REQUEST)
        busy.submit(block)
        time.sleep(0.3)  # in its 1.5 s pass
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with pytest.raises(Draining):  # a session with nothing in flight is ended at once
            idle.next_verdict(timeout=1.0)
        idle_ended = time.monotonic() - signalled
        assert _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        refused = raw_stream(address, [open_message(REQUEST)])
        assert refused.status is S.UNAVAILABLE and refused.code == "draining"
        verdicts = []
        with pytest.raises(Draining):
            while True:
                verdicts.append(busy.next_verdict(timeout=5.0))
        busy_ended = time.monotonic() - signalled
        server.proc.wait(10)
        exited = time.monotonic() - signalled
    finally:
        verifier.close()
        server.stop()
    final = [v for v in verdicts if v.kind is not VerdictKind.EARLY]
    assert [v.round for v in final] == [0] and final[0].kind is VerdictKind.FINAL  # the block in flight
    assert idle_ended < 0.5 < SECONDS_PER_PASS - 0.3 < busy_ended
    drained = _event(server, "drained")
    assert drained["sessions_ended"] == 2 and drained["sessions_cut_at_deadline"] == 0
    assert drained["after_signal_s"] < SECONDS_PER_PASS + 0.5 < 10.0  # when the block was answered, not the deadline
    assert server.proc.returncode == 0 and exited < 30  # the rest is the interpreter's teardown, slow under load
    print(f"\nSIGTERM with a block in flight: idle session ended after {idle_ended * 1000:.0f} ms, "
          f"the busy one after its verdict at {busy_ended * 1000:.0f} ms, drained at "
          f"{drained['after_signal_s']:.2f} s, server stopped at {_event(server, 'stopped')['after_signal_s']:.2f} s, "
          f"process exited at {exited:.2f} s")


def test_a_block_still_in_flight_at_the_drain_deadline_is_cut_with_draining_and_the_process_exits(target_dir,
                                                                                                   models):
    server = _start(target_dir, drain_timeout_s=0.3)
    verifier = GrpcVerifier(f"127.0.0.1:{server.port}", open_timeout_s=10.0, verdict_timeout_s=10.0)
    try:
        busy, block = _first_block(verifier)
        busy.submit(block)
        time.sleep(0.1)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        verdicts = []
        with pytest.raises(Draining, match="deadline"):
            while True:
                verdicts.append(busy.next_verdict(timeout=5.0))
        cut = time.monotonic() - signalled
        server.proc.wait(10)
        exited = time.monotonic() - signalled
    finally:
        verifier.close()
        server.stop()
    assert not [v for v in verdicts if v.kind is VerdictKind.FINAL]  # cut before its 1.5 s pass ended
    assert 0.25 < cut < 0.3 + 0.5
    stopped = _event(server, "stopped")["after_signal_s"]
    assert stopped < 0.3 + 1.0 + 0.5  # the deadline, then the gRPC server's 1 s grace for the stream threads
    assert server.proc.returncode == 0 and exited < 30  # the rest is the interpreter's teardown, slow under load
    print(f"\ndrain deadline 0.3 s, pass 1.5 s: session cut at {cut * 1000:.0f} ms, server stopped at "
          f"{stopped:.2f} s, process exited at {exited:.2f} s")


def test_a_second_signal_ends_the_drain_at_once(target_dir, models):
    server = _start(target_dir, drain_timeout_s=30.0)
    verifier = GrpcVerifier(f"127.0.0.1:{server.port}", open_timeout_s=10.0, verdict_timeout_s=10.0)
    try:
        busy, block = _first_block(verifier)
        busy.submit(DraftBlock(round=0, base_length=0, base_tail=(), tokens=(5, 6, 7)))
        busy.submit(DraftBlock(round=1, base_length=4, base_tail=(5, 6, 7), tokens=(8,), preemptive=True))
        time.sleep(0.1)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        server.proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        with pytest.raises(Draining):
            while True:
                busy.next_verdict(timeout=5.0)
        cut = time.monotonic() - signalled
        server.proc.wait(10)
    finally:
        verifier.close()
        server.stop()
    assert cut < 0.5 and server.proc.returncode == 0  # not the 30 s deadline, nor the two 1.5 s passes
