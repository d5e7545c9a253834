"""The robot-side client: a :class:`Verifier` over the gRPC protocol, with deadlines,
reconnection with back-off and an observable link state.

One ``GrpcVerifier`` holds one channel (HTTP/2 connection) to the cloud; each
``open()`` starts one bidirectional stream, the session. Verdicts are read by a thread
into a queue, so ``next_verdict`` honours its timeout whatever the network does. A broken
stream ends the session with :class:`LinkLost` (sessions live in the server's memory: a
new one must be opened, which ``open()`` retries with exponential back-off until its
deadline). Refusals arrive as typed :class:`Refused` subclasses with the server's reason,
mapped from the server's error code (or, from servers and proxies that send only a status,
from the gRPC status) through the one table in ``protocol.errors``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from speculative_vlm.decoding.verifier import (
    DraftBlock,
    LinkLost,
    Refused,
    SessionRequest,
    Verdict,
    Verifier,
    VerifierError,
    VerifierSession,
    VerifierTimeout,
)
from speculative_vlm.protocol import convert, errors
from speculative_vlm.protocol import verifier_pb2 as pb
from speculative_vlm.protocol.link import LinkListener, LinkMonitor, LinkState

METHOD = "/speculative_vlm.v1.Verification/Session"
TOKEN_ENV = "SPECULATIVE_VLM_TOKEN"


def read_token(token: str | None = None, token_file: str | None = None, env: str = TOKEN_ENV) -> str | None:
    """The bearer token: given, from a file, or from the environment (never from code)."""
    if token:
        return token
    if token_file:
        return Path(token_file).read_text().strip()
    return os.environ.get(env) or None


class GrpcSession(VerifierSession):
    """One session: a bidirectional stream. Created by :meth:`GrpcVerifier.open`."""

    def __init__(self, verifier: GrpcVerifier, first: pb.ClientMessage):
        self._verifier = verifier
        self._requests: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        self._events: queue.Queue[object] = queue.Queue()
        self._failure: VerifierError | None = None
        self._closing = False
        self._sent_at: list[float] = []  # submit times of blocks without a final answer
        self.session_id = ""
        self.opened: pb.Opened | None = None
        self._requests.put(first)
        self._call = verifier._session_rpc(
            self._request_stream(), metadata=verifier._metadata, timeout=verifier.session_deadline_s)
        threading.Thread(target=self._read, daemon=True, name="grpc-session-reader").start()

    def _request_stream(self) -> Iterator[pb.ClientMessage]:
        while True:
            message = self._requests.get()
            if message is None:
                return
            yield message

    def _read(self) -> None:
        try:
            for message in self._call:
                kind = message.WhichOneof("kind")
                if kind == "error":
                    # The stream ends right after with the same code's gRPC status; either says it.
                    error = errors.exception_for(message.error.code, message.error.reason)
                    self._fail(error, link_lost=isinstance(error, LinkLost))
                    return
                self._events.put(message if kind in ("opened", "token") else convert.verdict_from_pb(message))
            if not self._closing:
                self._fail(LinkLost("the server ended the stream without a reason; open a new session"),
                           link_lost=False)
        except grpc.RpcError as exc:
            if self._closing:
                return
            status, details = exc.code(), exc.details() or ""
            error = errors.exception_for_status(status, details, errors.code_in(exc.trailing_metadata()))
            if error is None:
                error = LinkLost(f"link to {self._verifier.address} lost ({status.name}: {details}); "
                                 "open a new session when the link is back")
            self._fail(error, link_lost=isinstance(error, LinkLost))

    def _fail(self, error: VerifierError, link_lost: bool) -> None:
        if self._failure is None:
            self._failure = error
            self._events.put(error)
        if link_lost:
            self._verifier.link.set(LinkState.LOST, str(error))

    # -- Verifier contract -----------------------------------------------------------
    def wait_opened(self, timeout: float) -> pb.Opened:
        event = self._next(timeout)
        if not isinstance(event, pb.ServerMessage) or event.WhichOneof("kind") != "opened":
            raise Refused("protocol_error", f"expected Opened, got {event!r}")
        self.opened = event.opened
        self.session_id = event.opened.session_id
        return event.opened

    def submit(self, block: DraftBlock) -> None:
        if self._failure is not None:
            raise self._failure
        self._sent_at.append(time.monotonic())
        self._requests.put(convert.draft_to_pb(block))

    def next_verdict(self, timeout: float | None = None) -> Verdict:
        verdict = self._next(self._verifier.verdict_timeout_s if timeout is None else timeout)
        if not isinstance(verdict, Verdict):
            raise Refused("protocol_error", f"expected a verdict, got {verdict!r}")
        if verdict.kind.name != "EARLY" and self._sent_at:
            round_trip = time.monotonic() - self._sent_at.pop(0)
            if self._verifier.link.state is not LinkState.LOST:
                slow = round_trip > self._verifier.degraded_after_s
                self._verifier.link.set(LinkState.DEGRADED if slow else LinkState.CONNECTED,
                                        f"verdict round trip {round_trip * 1000:.0f} ms")
        return verdict

    def next_token(self, timeout: float | None = None) -> pb.Token:
        """AUTOREGRESSIVE sessions: the next generated token."""
        event = self._next(self._verifier.verdict_timeout_s if timeout is None else timeout)
        if not isinstance(event, pb.ServerMessage) or event.WhichOneof("kind") != "token":
            raise Refused("protocol_error", f"expected a Token, got {event!r}")
        return event.token

    def _next(self, timeout: float) -> object:
        if self._failure is not None and self._events.empty():
            raise self._failure
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            if self._verifier.link.state is LinkState.CONNECTED:
                self._verifier.link.set(LinkState.DEGRADED, f"no answer within {timeout:g} s")
            raise VerifierTimeout(f"no answer from {self._verifier.address} within {timeout:g} s; "
                                  "the link or the server is slow, retry or open a new session") from None
        if isinstance(event, VerifierError):
            self._events.put(event)  # sticky: every later call fails the same way
            raise event
        return event

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._requests.put(pb.ClientMessage(close=pb.Close()))
        self._requests.put(None)
        # The server ends the stream after Close; cancel in case it cannot (link down).
        threading.Timer(1.0, self._call.cancel).start()


class GrpcVerifier(Verifier):
    """``GrpcVerifier("cloud.example:443", tls=True)``; token from ``SPECULATIVE_VLM_TOKEN`` by default."""

    def __init__(self, address: str, token: str | None = None, *, token_file: str | None = None,
                 tls: bool = False, root_cert: bytes | None = None, server_name: str | None = None,
                 open_timeout_s: float = 15.0, verdict_timeout_s: float = 10.0, degraded_after_s: float = 1.0,
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 2.0, keepalive_s: float = 2.0,
                 session_deadline_s: float = 3600.0):
        self.address = address
        self.open_timeout_s = open_timeout_s
        self.verdict_timeout_s = verdict_timeout_s
        self.degraded_after_s = degraded_after_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.session_deadline_s = session_deadline_s
        bearer = read_token(token, token_file)
        self._metadata = (("authorization", f"Bearer {bearer}"),) if bearer else ()
        options = [
            # Detect a dead link (no RST, e.g. a cut cable) within about 2 keepalive periods.
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", int(backoff_initial_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(backoff_initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(backoff_max_s * 1000)),
            ("grpc.enable_retries", 0),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_cert:
            creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._session_rpc = self._channel.stream_stream(
            METHOD, request_serializer=pb.ClientMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString)
        self.link = LinkMonitor(LinkState.DEGRADED)
        self._channel.subscribe(self._on_connectivity, try_to_connect=True)

    @property
    def link_state(self) -> LinkState:
        return self.link.state

    def add_link_listener(self, listener: LinkListener) -> None:
        self.link.add_listener(listener)

    def _on_connectivity(self, connectivity: grpc.ChannelConnectivity) -> None:
        if connectivity is grpc.ChannelConnectivity.READY:
            self.link.set(LinkState.CONNECTED, "channel ready")
        elif connectivity is grpc.ChannelConnectivity.CONNECTING and self.link.state is LinkState.CONNECTED:
            self.link.set(LinkState.DEGRADED, "reconnecting")
        elif connectivity is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self.link.set(LinkState.LOST, f"cannot reach {self.address}; retrying with back-off")
        elif connectivity is grpc.ChannelConnectivity.SHUTDOWN:
            self.link.set(LinkState.LOST, "channel closed")

    def open(self, request: SessionRequest) -> GrpcSession:
        return self._open(convert.open_to_pb(request))

    def open_autoregressive(self, request: SessionRequest) -> GrpcSession:
        """A session in which the cloud generates alone (the baseline); read it with ``next_token``."""
        return self._open(convert.open_to_pb(request, autoregressive=True))

    def _open(self, first: pb.ClientMessage) -> GrpcSession:
        deadline = time.monotonic() + self.open_timeout_s
        backoff = self.backoff_initial_s
        while True:
            session = GrpcSession(self, first)
            try:
                session.wait_opened(max(0.01, deadline - time.monotonic()))
                return session
            except LinkLost as exc:
                session.close()
                if time.monotonic() + backoff >= deadline:
                    raise LinkLost(f"could not open a session on {self.address} within "
                                   f"{self.open_timeout_s:g} s: {exc}") from exc
                time.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
            except VerifierError:
                session.close()
                raise

    def generate(self, request: SessionRequest, on_token: Callable[[int], None] | None = None) -> list[int]:
        """Cloud autoregressive decoding: the target's output tokens for ``request``."""
        session = self.open_autoregressive(request)
        tokens: list[int] = []
        try:
            while True:
                token = session.next_token()
                if token.token >= 0:
                    tokens.append(token.token)
                    if on_token is not None:
                        on_token(token.token)
                if token.eos:
                    return tokens
        finally:
            session.close()

    def serving(self, timeout_s: float = 2.0) -> bool:
        """Whether the server's standard health service reports the verifier as SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service="speculative_vlm.v1.Verification"), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()
