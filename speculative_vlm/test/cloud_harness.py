"""Test support for the cloud verifier: the server started in this process with its tokens
(:func:`serving`; conftest's ``cloud_server`` fixture), raw streams as a broken or hostile client
sends them (and how each ended: replies, gRPC status, error code), healthy robots decoding in a
loop with every round timed, and the verifier server as a subprocess whose memory can be read.
Real gRPC on loopback throughout, nothing mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.cloud.server import serve
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    SessionRequest,
    Verdict,
    VerdictKind,
    Verifier,
    VerifierSession,
)
from speculative_vlm.protocol import convert, errors
from speculative_vlm.protocol import verifier_pb2 as pb
from speculative_vlm.protocol.client import METHOD, GrpcVerifier

HERE = Path(__file__).resolve().parent


# ---- the server in this process ---------------------------------------------------------------
@contextlib.contextmanager
def serving(config: ServerConfig, engine, tokens: str | None = None,
            tokens_env: str = "SPECULATIVE_VLM_TOKENS") -> Iterator:
    """The verifier serving ``engine`` with ``config`` until the block ends. ``tokens``
    ("name:token,...") is in ``tokens_env`` while it starts, where an operator puts them."""
    with pytest.MonkeyPatch.context() as env:
        if tokens is not None:
            env.setenv(tokens_env, tokens)
        handle = serve(config, engine=engine)
    try:
        yield handle
    finally:
        handle.stop()


# ---- its metrics --------------------------------------------------------------------------------
def scrape(metrics_port: int, timeout: float = 5.0) -> list:
    """The metric families the server's /metrics on ``metrics_port`` serves now."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=timeout).read().decode()
    return list(text_string_to_metric_families(text))


def metric_sum(families: list, name: str, **labels: str | None) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
    return sum(s.value for f in families for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- raw streams ------------------------------------------------------------------------------
@dataclass
class StreamEnd:
    """How a stream ended: the messages it got, its gRPC status, and the project's error code."""

    replies: list[pb.ServerMessage]
    status: grpc.StatusCode
    details: str
    code: str | None  # from the trailing metadata (protocol.errors.CODE_KEY)
    ended_after_s: float


class RawStream:
    """One stream of raw messages (bytes), held open until :meth:`hang_up` or the server ends it."""

    def __init__(self, channel: grpc.Channel, messages: Iterable[bytes] = (), token: str | None = None,
                 hold: bool = True, timeout: float = 30.0):
        self._hang_up = threading.Event()
        self.started = time.monotonic()
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        call = channel.stream_stream(METHOD, request_serializer=lambda b: b,
                                     response_deserializer=pb.ServerMessage.FromString)
        self._call = call(self._requests(list(messages), hold), metadata=metadata, timeout=timeout)

    def _requests(self, messages: list[bytes], hold: bool) -> Iterator[bytes]:
        yield from messages
        if hold:  # a client that connected and then went quiet
            self._hang_up.wait()

    def done(self) -> bool:
        return self._call.done()

    def end(self) -> StreamEnd:
        """Wait for the stream to end (the server ends it, or the call's timeout does)."""
        replies: list[pb.ServerMessage] = []
        try:
            for reply in self._call:
                replies.append(reply)
        except grpc.RpcError:
            pass
        ended = time.monotonic() - self.started
        self._hang_up.set()
        return StreamEnd(replies, self._call.code(), self._call.details() or "",
                         errors.code_in(self._call.trailing_metadata()), ended)

    def hang_up(self) -> None:
        self._hang_up.set()
        self._call.cancel()


def open_message(request: SessionRequest) -> bytes:
    return convert.open_to_pb(request).SerializeToString()


def draft_message(block: DraftBlock) -> bytes:
    return convert.draft_to_pb(block).SerializeToString()


def raw_stream(address: str, messages: Iterable[bytes], token: str | None = None,
               timeout: float = 10.0) -> StreamEnd:
    """Send ``messages`` on one stream, stop sending, and return how the stream ended."""
    with grpc.insecure_channel(address) as channel:
        return RawStream(channel, messages, token, hold=False, timeout=timeout).end()


# ---- healthy robots ---------------------------------------------------------------------------
@dataclass
class Round:
    submitted: float
    answered: float

    @property
    def delay(self) -> float:
        return self.answered - self.submitted


class _TimedSession(VerifierSession):
    def __init__(self, inner: VerifierSession, rounds: list[Round]):
        self._inner, self._rounds = inner, rounds
        self._submitted: list[float] = []
        self.session_id = inner.session_id

    def submit(self, block: DraftBlock) -> None:
        self._submitted.append(time.monotonic())
        self._inner.submit(block)

    def next_verdict(self, timeout: float | None = None) -> Verdict:
        verdict = self._inner.next_verdict(timeout)
        if verdict.kind is not VerdictKind.EARLY and self._submitted:
            self._rounds.append(Round(self._submitted.pop(0), time.monotonic()))
        return verdict

    def close(self) -> None:
        self._inner.close()


class _TimedVerifier(Verifier):
    """A verifier whose sessions record each round: when its block went out, when its final answer came."""

    def __init__(self, inner: Verifier, rounds: list[Round]):
        self._inner, self._rounds = inner, rounds

    def open(self, request: SessionRequest) -> VerifierSession:
        return _TimedSession(self._inner.open(request), self._rounds)


@dataclass
class Outcome:
    """What a healthy robot saw: decodes that matched the target alone, the ones that did not, errors."""

    matched: int = 0
    mismatched: int = 0
    errors: list[str] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)

    def longest_round(self, since: float = 0.0, until: float = float("inf")) -> float:
        """The longest delay of a round that was in flight at some time in [since, until]."""
        delays = [r.delay for r in self.rounds if r.answered >= since and r.submitted <= until]
        return max(delays, default=0.0)

    def rounds_within(self, since: float, until: float) -> int:
        return sum(1 for r in self.rounds if since <= r.answered <= until)

    def __str__(self) -> str:
        return (f"{self.matched} decodes equal to the target alone, {self.mismatched} not, "
                f"{len(self.errors)} errors")


class HealthyRobot(threading.Thread):
    """A robot decoding ``request`` through the server again and again until stopped.

    Every output is compared with ``expected`` (the target alone); every round is timed.
    """

    def __init__(self, address: str, token: str, draft, request: SessionRequest, expected: list[int],
                 verdict_timeout_s: float = 15.0):
        super().__init__(daemon=True, name=f"healthy-{token[:8]}")
        self.address, self.token, self.draft = address, token, draft
        self.request, self.expected = request, expected
        self.verdict_timeout_s = verdict_timeout_s
        self.outcome = Outcome()
        self._halt = threading.Event()
        self.first_decode = threading.Event()

    def run(self) -> None:
        verifier = GrpcVerifier(self.address, token=self.token, verdict_timeout_s=self.verdict_timeout_s,
                                open_timeout_s=self.verdict_timeout_s)
        decoder = SpeculativeDecoder(self.draft, _TimedVerifier(verifier, self.outcome.rounds),
                                     verdict_timeout_s=self.verdict_timeout_s)
        try:
            while not self._halt.is_set():
                try:
                    tokens = decoder.generate(self.request).token_ids
                except Exception as exc:  # recorded and judged by the test
                    self.outcome.errors.append(f"{type(exc).__name__}: {exc}")
                    time.sleep(0.1)
                    continue
                if tokens == self.expected:
                    self.outcome.matched += 1
                else:
                    self.outcome.mismatched += 1
                self.first_decode.set()
        finally:
            verifier.close()

    def request_stop(self) -> None:
        """Stop after the decode in flight."""
        self._halt.set()

    def stop(self, timeout: float = 30.0) -> Outcome:
        self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), f"robot {self.token[:8]} did not end its decode within {timeout} s"
        return self.outcome


# ---- the server as a process ------------------------------------------------------------------
@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    log: list[dict] = field(default_factory=list)  # its JSON log lines, as they come

    def event(self, name: str) -> dict | None:
        return next((line for line in self.log if line.get("event") == name), None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def metric(self, name: str) -> float:
        """One sample from the server's /metrics: ``name`` or ``name{label="value",...}``, its model label aside."""
        import re

        wanted_name, _, rest = name.partition("{")
        wanted = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        for family in scrape(self.metrics_port):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "model"}
                if sample.name == wanted_name and labels == wanted:
                    return sample.value
        raise KeyError(f"{name} not in /metrics")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_server(model_dir: Path, config: Path, tokens: str, seconds_per_token: float) -> ServerProcess:
    """``speculative-vlm-cloud --config config`` on the target in ``model_dir``, slowed as a big model.

    Runs test/slow_cloud_server.py (the real ``main()``, signals included); returns once it serves.
    """
    return start_server_script("slow_cloud_server.py", str(seconds_per_token), "--config", str(config),
                               "--model", str(model_dir), tokens=tokens)


def start_server_script(script: str, *args: str, tokens: str = "") -> ServerProcess:
    """``python test/<script> args...`` (a wrapper around the real ``main()``); returns once it serves."""
    return start_server_command([sys.executable, str(HERE / script), *args], tokens)


def start_server_command(command: list[str], tokens: str = "") -> ServerProcess:
    """A verifier server started by ``command`` with ``tokens`` in its environment; returns once it serves."""
    env = dict(os.environ, SPECULATIVE_VLM_TOKENS=tokens)
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"the server exited before serving (code {proc.wait()})")
        if line.startswith("{") and json.loads(line).get("event") == "serving":
            serving = json.loads(line)
            server = ServerProcess(proc, serving["port"], serving.get("metrics_port"))

            threading.Thread(target=_keep_reading, args=(server,), daemon=True).start()
            return server
    proc.kill()
    raise RuntimeError("the server did not serve within 90 s")


def _keep_reading(server: ServerProcess) -> None:
    """Collect the server's JSON log lines (reading them also keeps a full pipe from stalling it)."""
    for line in server.proc.stderr:
        if line.startswith("{"):
            server.log.append(json.loads(line))


class MemoryWatch(threading.Thread):
    """Samples a process's RSS until stopped; ``peak_mb`` is the highest seen."""

    def __init__(self, server: ServerProcess, period_s: float = 0.05):
        super().__init__(daemon=True)
        self.server, self.period_s = server, period_s
        self.peak_mb = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak_mb = max(self.peak_mb, self.server.rss_mb())
            except psutil.Error:
                return
            self._halt.wait(self.period_s)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak_mb
