"""The robot-side client: a :class:`Verifier` over the gRPC protocol, with deadlines,
reconnection with back-off, fail-over between verifier addresses and an observable link state.

One ``GrpcVerifier`` holds one channel (HTTP/2 connection) per verifier address; each
``open()`` starts one bidirectional stream, the session, on the current address. Verdicts are
read by a thread into a queue, so ``next_verdict`` honours its timeout whatever the network
does. A broken stream ends the session with :class:`LinkLost` (sessions live in the server's
memory: a new one must be opened). A server that drains for a restart ends its sessions, and
refuses new ones, with :class:`Draining` (a ``LinkLost``: retryable, ``protocol.errors``).
``open()`` retries both until its deadline: it moves to the next address at once (when there
is one), and backs off exponentially each time it has tried them all. Refusals arrive as typed
:class:`Refused` subclasses with the server's reason, mapped from the server's error code (or,
from servers and proxies that send only a status, from the gRPC status) through the one table
in ``protocol.errors``; they are never retried here.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from speculative_vlm.decoding.sessions import Opened, StreamedToken
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    Draining,
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
        self.opened: Opened | None = None
        self.address = verifier.address  # the one this session runs on
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
                    self._fail(errors.exception_for(message.error.code, message.error.reason))
                    return
                if kind == "opened":
                    self._events.put(convert.opened_from_pb(message.opened))
                elif kind == "token":
                    self._events.put(convert.token_from_pb(message.token))
                else:
                    self._events.put(convert.verdict_from_pb(message))
            if not self._closing:
                self._fail(LinkLost("the server ended the stream without a reason; open a new session"),
                           link_state=None)
        except grpc.RpcError as exc:
            if self._closing:
                return
            status, details = exc.code(), exc.details() or ""
            error = errors.exception_for_status(status, details, errors.code_in(exc.trailing_metadata()))
            if error is None:
                error = LinkLost(f"link to {self.address} lost ({status.name}: {details}); "
                                 "open a new session when the link is back")
            self._fail(error)

    def _fail(self, error: VerifierError, link_state: LinkState | None = LinkState.LOST) -> None:
        """End the session with ``error``; a lost link also changes the link's state.

        A draining server is still reachable and comes back (or another one takes over): the link
        is DEGRADED, not LOST, while the robot reopens the session.
        """
        if self._failure is None:
            self._failure = error
            self._events.put(error)
        if isinstance(error, Draining):
            link_state = LinkState.DEGRADED
        if link_state is not None and isinstance(error, LinkLost):
            self._verifier.link.set(link_state, str(error))

    # -- Verifier contract -----------------------------------------------------------
    def wait_opened(self, timeout: float) -> Opened:
        event = self._next(timeout)
        if not isinstance(event, Opened):
            raise Refused("protocol_error", f"expected Opened, got {event!r}")
        self.opened = event
        self.session_id = event.session_id
        return event

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

    def next_token(self, timeout: float | None = None) -> StreamedToken:
        """AUTOREGRESSIVE sessions: the next generated token."""
        event = self._next(self._verifier.verdict_timeout_s if timeout is None else timeout)
        if not isinstance(event, StreamedToken):
            raise Refused("protocol_error", f"expected a Token, got {event!r}")
        return event

    def _next(self, timeout: float) -> object:
        if self._failure is not None and self._events.empty():
            raise self._failure
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            if self._verifier.link.state is LinkState.CONNECTED:
                self._verifier.link.set(LinkState.DEGRADED, f"no answer within {timeout:g} s")
            raise VerifierTimeout(f"no answer from {self.address} within {timeout:g} s; "
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
    """``GrpcVerifier("cloud.example:443", tls=True)``; token from ``SPECULATIVE_VLM_TOKEN`` by default.

    ``address`` may be a list: the first is used until a session on it is lost or refused with
    ``draining``, then ``open()`` moves on to the next (and around), so a fleet can be restarted
    one server at a time, or a standby take over, while robots keep their goals.
    """

    def __init__(self, address: str | Sequence[str], token: str | None = None, *, token_file: str | None = None,
                 tls: bool = False, root_cert: bytes | None = None, server_name: str | None = None,
                 client_cert: bytes | None = None, client_key: bytes | None = None,
                 open_timeout_s: float = 15.0, verdict_timeout_s: float = 10.0, degraded_after_s: float = 1.0,
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 2.0, keepalive_s: float = 2.0,
                 session_deadline_s: float = 3600.0):
        self.addresses = [address] if isinstance(address, str) else [a for a in address if a]
        if not self.addresses:
            raise ValueError("GrpcVerifier needs at least one verifier address (host:port)")
        self._current = 0
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
        if bool(client_cert) != bool(client_key):
            raise ValueError("client_cert and client_key (mutual TLS) go together: give both or neither")
        # client_cert/client_key: mutual TLS, the server verifies this client's certificate too.
        creds = grpc.ssl_channel_credentials(root_certificates=root_cert, private_key=client_key,
                                             certificate_chain=client_cert) if tls or root_cert or client_cert \
            else None
        self._channels = [grpc.secure_channel(a, creds, options=options) if creds is not None
                          else grpc.insecure_channel(a, options=options) for a in self.addresses]
        self._session_rpcs = [channel.stream_stream(
            METHOD, request_serializer=pb.ClientMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString) for channel in self._channels]
        self.link = LinkMonitor(LinkState.DEGRADED)
        for index, channel in enumerate(self._channels):
            # Fallbacks connect when first used; the link state follows the address in use.
            channel.subscribe(lambda state, index=index: self._on_connectivity(index, state),
                              try_to_connect=index == 0)

    @property
    def address(self) -> str:
        """The address sessions are opened on now."""
        return self.addresses[self._current]

    @property
    def _channel(self) -> grpc.Channel:
        return self._channels[self._current]

    @property
    def _session_rpc(self) -> grpc.StreamStreamMultiCallable:
        return self._session_rpcs[self._current]

    @property
    def link_state(self) -> LinkState:
        return self.link.state

    def add_link_listener(self, listener: LinkListener) -> None:
        self.link.add_listener(listener)

    def _on_connectivity(self, index: int, connectivity: grpc.ChannelConnectivity) -> None:
        if index != self._current:
            return
        if connectivity is grpc.ChannelConnectivity.READY:
            self.link.set(LinkState.CONNECTED, f"channel to {self.addresses[index]} ready")
        elif connectivity is grpc.ChannelConnectivity.CONNECTING and self.link.state is LinkState.CONNECTED:
            self.link.set(LinkState.DEGRADED, "reconnecting")
        elif connectivity is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self.link.set(LinkState.LOST, f"cannot reach {self.addresses[index]}; retrying with back-off")
        elif connectivity is grpc.ChannelConnectivity.SHUTDOWN:
            self.link.set(LinkState.LOST, "channel closed")

    def _fail_over(self, reason: str) -> None:
        """Open the next sessions on the next address (around the list)."""
        if len(self.addresses) == 1:
            return
        previous = self.address
        self._current = (self._current + 1) % len(self.addresses)
        self.link.set(LinkState.DEGRADED, f"{previous} unavailable ({reason}); trying {self.address}")

    def open(self, request: SessionRequest) -> GrpcSession:
        return self._open(convert.open_to_pb(request))

    def open_autoregressive(self, request: SessionRequest) -> GrpcSession:
        """A session in which the cloud generates alone (the baseline); read it with ``next_token``."""
        return self._open(convert.open_to_pb(request, autoregressive=True))

    def _open(self, first: pb.ClientMessage) -> GrpcSession:
        """A session on the first address that opens one before the open deadline.

        A lost link or a draining server moves on to the next address at once; after each round
        of all of them the client backs off (doubling, up to ``backoff_max_s``). Refusals are
        raised at once: another address would refuse the same request.
        """
        deadline = time.monotonic() + self.open_timeout_s
        backoff = self.backoff_initial_s
        attempts = 0
        while True:
            session = GrpcSession(self, first)
            try:
                session.wait_opened(max(0.01, deadline - time.monotonic()))
                self.link.set(LinkState.CONNECTED, f"session {session.session_id} opened on {session.address}")
                return session
            except LinkLost as exc:
                session.close()
                attempts += 1
                self._fail_over(str(exc))
                wait = backoff if attempts % len(self.addresses) == 0 else 0.0
                if time.monotonic() + wait >= deadline:
                    raise type(exc)(f"could not open a session on {', '.join(self.addresses)} within "
                                    f"{self.open_timeout_s:g} s ({attempts} attempts): {exc}",
                                    code=exc.code) from exc
                if wait:
                    time.sleep(wait)
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
        for channel in self._channels:
            channel.close()
