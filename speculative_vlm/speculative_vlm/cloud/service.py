"""The gRPC service: one bidirectional stream per session, on top of the verification core
(``decoding.sessions``' store and ``decoding.scheduler``'s batch scheduler, the same the
in-process verifier runs on).

This module and ``protocol`` are the only places a protobuf message exists on the server: each
client message is converted once on the way in (``protocol.convert``), and each event of a
session's outbox (engine dataclasses: ``Opened``, ``Verdict``, ``StreamedToken``, the error
that ended it) once on the way out.

Each stream has two threads: the gRPC handler thread drains the session's outbox into the
response stream, and a reader thread takes the client's messages (so an Early verdict can
go out while the client is still sending). Every refusal is an ``Error`` message with a
code and a reason on that stream only, after which the stream ends with the code's gRPC
status (``protocol.errors``: UNAUTHENTICATED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...),
the reason as its details and the code in its trailing metadata; other sessions are not
affected. Garbage that does not parse as a ``ClientMessage`` is refused the same way,
because the service installs its own request deserializer.

Fair shares of the server: a stream counts against its client and the server's total from
its first byte (before Open), must send Open within the open timeout, and a peer address
that fails authentication too often is locked out. An Open is admitted by its length in
tokens (after the chat template and the image) and by the KV-cache memory it reserves;
its prefill then runs a chunk at a time in background turns on the model
(``cloud.turns``), so other sessions' verification passes wait for one chunk at most.

Restarts (:meth:`VerificationService.drain`, on SIGTERM): new streams, Opens and Drafts are
turned away, the blocks already queued or in a pass are answered, and each session is then
ended with the retryable ``draining`` code, so its robot decodes the step again elsewhere or
here once the server is back; the drain has a deadline and never waits for the model past it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from speculative_vlm.cloud.auth import AuthThrottle, AuthThrottled, TokenAuthenticator, Unauthenticated
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.cloud.limits import (
    KVBudget,
    LimitExceeded,
    RateLimiter,
    check_draft,
    check_open,
    check_prompt_tokens,
    return_free_memory,
)
from speculative_vlm.cloud.metrics import ServerMetrics
from speculative_vlm.cloud.turns import ModelTurns
from speculative_vlm.decoding import admission
from speculative_vlm.decoding.scheduler import BatchScheduler, PassRecord
from speculative_vlm.decoding.sessions import Opened, ServedSession, SessionStore, Stage, StreamedToken
from speculative_vlm.decoding.verifier import Refused, Verdict, VerdictKind
from speculative_vlm.protocol import convert, errors
from speculative_vlm.protocol import verifier_pb2 as pb

log = logging.getLogger("speculative_vlm.cloud.service")

SERVICE_NAME = "speculative_vlm.v1.Verification"
# Reserved KV memory given back since the last trim after which the allocator is trimmed.
TRIM_AFTER_BYTES = 4 * 2**20
DRAINING_REASON = ("the verifier is draining for a restart or a rollout; blocks already in flight were answered. "
                   "Reopen the session (here once the server is back, or on another) and decode the step again")
# How often a drain looks at its sessions again when no pass ended meanwhile.
DRAIN_POLL_S = 0.05


class Malformed:
    """What the deserializer returns for bytes that are not a ClientMessage."""

    def __init__(self, reason: str):
        self.reason = reason


def deserialize_client_message(data: bytes) -> pb.ClientMessage | Malformed:
    try:
        msg = pb.ClientMessage.FromString(data)
    except DecodeError as exc:
        return Malformed(f"bytes do not parse as speculative_vlm.v1.ClientMessage ({exc})")
    if msg.WhichOneof("kind") is None:
        return Malformed("message has none of open/draft/close set; is the client speaking protocol v1?")
    return msg


def authenticate_stream(auth: TokenAuthenticator | None, throttle: AuthThrottle, address: str,
                        context: grpc.ServicerContext) -> str:
    """The client name of a new stream from ``address``; raises LimitExceeded (unauthenticated,
    auth_throttled). Shared by the single-process service and the Ray Serve front."""
    if auth is None:
        return address  # without authentication a client is its address
    try:
        throttle.check(address)
    except AuthThrottled as exc:
        raise LimitExceeded("auth_throttled", str(exc)) from None
    try:
        return auth.client_for(context.invocation_metadata())
    except Unauthenticated as exc:
        throttle.failed(address)
        raise LimitExceeded("unauthenticated", str(exc)) from None


def record_pass(metrics: ServerMetrics, record: PassRecord) -> None:
    """A verification pass in the server's metrics (the scheduler's ``on_pass``)."""
    for item in record.items:
        metrics.queue_wait.observe(item.waited_s)
        for verdict in item.early:
            metrics.early_verdicts.labels(str(verdict.exit_layer)).inc()
    metrics.batch_size.observe(len(record.items))
    metrics.verify_latency.observe(record.seconds)
    finals = [(item, item.result) for item in record.items
              if isinstance(item.result, Verdict) and item.result.kind is VerdictKind.FINAL]
    metrics.accepted_per_pass.observe(sum(verdict.accepted for _, verdict in finals))
    for item in record.items:
        if isinstance(item.result, Verdict) and item.result.kind is VerdictKind.DROPPED:
            metrics.rounds_total.labels("dropped").inc()
    for item, final in finals:
        metrics.rounds_total.labels("verified").inc()
        metrics.accepted_tokens.observe(final.accepted)
        metrics.observe_verified(len(item.block.tokens), final.accepted)
        for verdict in item.early:
            metrics.observe_early(verdict.exit_layer, verdict.accepted == final.accepted
                                  and verdict.token == final.token)
        if item.first_output:
            metrics.time_to_first_token.labels("speculative").observe(
                item.session.first_output - item.session.open_received)


def end_rpc(context: grpc.ServicerContext, code: str, reason: str) -> None:
    """End a refused stream with the code's gRPC status, the reason and the code (protocol.errors)."""
    context.set_trailing_metadata(errors.trailing_metadata(code))
    context.set_code(errors.status_for(code))
    context.set_details(reason)


class VerificationService:
    def __init__(self, config: ServerConfig, engine: Any, metrics: ServerMetrics,
                 authenticator: TokenAuthenticator | None):
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.auth = authenticator
        self.store = SessionStore(config.session_idle_s)
        limits = config.limits
        self.rate = RateLimiter(limits.requests_per_second, limits.burst)
        self.auth_throttle = AuthThrottle(limits.auth_max_failures, limits.auth_window_s,
                                          limits.auth_lockout_s, limits.auth_max_lockout_s)
        # The model's turns: the scheduler's passes (and closes, and autoregressive steps) are
        # urgent, prefill chunks are background work between them.
        self.engine_lock = ModelTurns(observe_wait=metrics.model_wait.observe)
        self.scheduler = BatchScheduler(engine, self.store, max_batch=config.max_batch,
                                        max_wait_s=config.max_wait_ms / 1000, engine_lock=self.engine_lock,
                                        on_failed=self._block_failed, on_pass=lambda r: record_pass(metrics, r))
        self.scheduler.watch(lambda _reason: metrics.scheduler_up.set(0))
        model = getattr(engine, "model", None)
        self.vocab_size: int | None = getattr(model, "vocab_size", None)
        self.kv_budget = KVBudget(int(limits.kv_budget_mb * 2**20), getattr(engine, "kv_bytes_per_token", 0),
                                  client_share=limits.max_sessions_per_client / limits.max_sessions)
        # A stream gets no more time to send Open than an open session gets to stay idle.
        self.open_timeout_s = min(config.open_timeout_s, config.session_idle_s)
        self._stopped = threading.Event()
        self._draining = threading.Event()  # SIGTERM: no new work; sessions end once their blocks are answered
        self._janitor = threading.Thread(target=self._expire_idle, daemon=True, name="session-janitor")
        self._janitor.start()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Session": grpc.stream_stream_rpc_method_handler(
                self.session,
                request_deserializer=deserialize_client_message,
                response_serializer=pb.ServerMessage.SerializeToString,
            ),
        })

    # -- the stream ----------------------------------------------------------------
    def session(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[pb.ServerMessage]:
        peer = context.peer()
        # One robot, many ports: the host part is the peer's address.
        address = peer.rsplit(":", 1)[0]
        client = "?"
        try:
            client = authenticate_stream(self.auth, self.auth_throttle, address, context)
            if self._draining.is_set():
                raise LimitExceeded("draining", DRAINING_REASON)
            session = ServedSession(client=client, peer=peer)
            limits = self.config.limits
            self.store.admit(session, limits.max_sessions, limits.max_sessions_per_client)
        except LimitExceeded as exc:
            self._count_refusal(exc.code, exc.reason, client=client, peer=peer)
            yield convert.error(exc.code, exc.reason)
            end_rpc(context, exc.code, exc.reason)
            return
        self.metrics.streams.inc()
        context.add_callback(lambda: self._cleanup(session))  # client cancelled or link died
        threading.Thread(target=self._read, args=(session, requests), daemon=True,
                         name=f"reader-{session.id}").start()
        try:
            while True:
                timeout = None
                if session.stage is Stage.CONNECTED:
                    # A stream that never opens a session would hold an RPC slot: it gets seconds.
                    timeout = max(0.0, session.started + self.open_timeout_s - time.monotonic())
                try:
                    message = session.outbox.get(timeout=timeout)
                except queue.Empty:
                    if session.stage is Stage.CONNECTED:
                        self._fail(session, "open_timeout", f"no Open within {self.open_timeout_s:g} s of "
                                   "connecting; send Open first")
                    continue
                if message is None:
                    break
                yield convert.event_to_pb(message)
            if session.error is not None:
                end_rpc(context, session.error.code, session.error.reason)
        finally:
            self._cleanup(session)

    def _read(self, session: ServedSession, requests: Iterator[Any]) -> None:
        try:
            for message in requests:
                session.touch()
                if session.closed:
                    return
                if isinstance(message, Malformed):
                    self._fail(session, "malformed", message.reason)
                    return
                kind = message.WhichOneof("kind")
                if kind == "open":
                    self._open(session, message.open)
                elif kind == "draft":
                    self._draft(session, message.draft)
                else:
                    session.end()
                    return
        except Exception as exc:  # the client went away mid-read; nothing to answer
            log.debug("stream read ended", extra={"event": "read_end", "session": session.id, "error": repr(exc)})
        finally:
            if not session.closed and session.target is None:
                session.end()

    def _open(self, session: ServedSession, msg: pb.Open) -> None:
        session.open_received = time.monotonic()
        if self._draining.is_set():
            self._fail(session, "draining", DRAINING_REASON)
            return
        if session.stage is not Stage.CONNECTED:
            self._fail(session, "already_open", f"session {session.id} is open; one Open per stream")
            return
        if msg.protocol_version != convert.PROTOCOL_VERSION:
            self._fail(session, "unsupported_version", f"protocol version {msg.protocol_version} is not served; "
                       f"this server speaks {convert.PROTOCOL_VERSION}")
            return
        if msg.mode not in (pb.SPECULATIVE, pb.AUTOREGRESSIVE):
            self._fail(session, "unsupported_mode", f"mode {msg.mode} is not served; use SPECULATIVE or "
                       "AUTOREGRESSIVE")
            return
        try:
            self.rate.take(session.client)
            request = convert.open_from_pb(msg)
            admission.check_request(request)  # every field in range before any work (InvalidArgument)
            check_open(request, self.config.limits)
        except (LimitExceeded, Refused) as exc:
            self._fail(session, exc.code, exc.reason)
            return
        session.stage = Stage.OPENING
        limits = self.config.limits
        start = time.monotonic()
        target = None
        try:
            pending = self.engine.begin_session(request)  # the prompt in tokens, as the model will see it
            check_prompt_tokens(pending.prompt_tokens, limits)
            # The most the cache can hold: the prompt, every new token, and a block on top.
            most = pending.prompt_tokens + request.settings.max_new_tokens + limits.max_draft_tokens + 1
            self.kv_budget.reserve(session.id, session.client, most)
            self.metrics.kv_reserved_bytes.set(self.kv_budget.used_bytes)
            while not pending.done:
                if session.closed:  # the client left or the server stops: within a chunk
                    return
                with self.engine_lock.background():
                    self.engine.prefill_step(pending)
            target = self.engine.finish_session(pending)
        except (LimitExceeded, Refused) as exc:
            self._fail(session, exc.code, exc.reason)
            return
        except Exception as exc:
            log.exception("prefill failed", extra={"event": "open_failed", "session": session.id})
            self._fail(session, "open_failed", f"the target could not prefill this request ({exc!r})")
            return
        finally:
            if target is None:  # not opened: whatever was reserved goes back (idempotent)
                self._release(session)
        if not session.attach(target):  # the stream ended as the prefill finished
            with self.engine_lock:
                self.engine.close_session(target)
            self._release(session)
            return
        prefill = time.monotonic() - start
        if msg.mode == pb.SPECULATIVE:
            self.scheduler.register(session)
            if session.closed:
                self.scheduler.unregister(session)
        self.metrics.sessions_total.inc()
        self.metrics.sessions_open.inc()
        model = getattr(self.engine, "model", None)
        session.send(Opened(
            session_id=session.id, prefill_time_s=prefill,
            target_model=str(getattr(model, "name", "") or self.config.model),
            exit_layers=tuple(getattr(self.engine, "exit_layers", self.config.exit_layers)),
            vocab_size=self.vocab_size or 0, eos_token_ids=tuple(getattr(model, "eos_token_ids", ()))))
        log.info("session opened", extra={"event": "open", "session": session.id, "client": session.client,
                                          "peer": session.peer, "prefill_s": round(prefill, 4),
                                          "prompt_tokens": pending.prompt_tokens,
                                          "prefill_chunks": pending.steps,
                                          "image": request.image is not None,
                                          "mode": pb.Mode.Name(msg.mode)})
        if msg.mode == pb.AUTOREGRESSIVE:
            threading.Thread(target=self._generate, args=(session,), daemon=True,
                             name=f"generate-{session.id}").start()

    def _generate(self, session: ServedSession) -> None:
        """The cloud-autoregressive baseline: stream the target's own tokens as they are decided.

        The engine lock is taken per token, so verification passes of other sessions
        interleave with this generation instead of waiting for all of it.
        """
        tokens = self.engine.generate(session.target)
        index = 0
        try:
            while not session.closed:
                with self.engine_lock:
                    token = next(tokens, None)
                if token is None:
                    break
                # Not marked eos here: the engine may still yield tokens the grammar forces
                # after the output is complete; the end is the generator's end, sent below.
                if session.first_output is None:
                    session.first_output = time.monotonic()
                    self.metrics.time_to_first_token.labels("autoregressive").observe(
                        session.first_output - session.open_received)
                session.send(StreamedToken(index=index, token=int(token), eos=False))
                self.metrics.tokens_generated.inc()
                session.touch()
                index += 1
            session.send(StreamedToken(index=index, token=-1, eos=True))
        except Exception as exc:
            log.exception("generation failed", extra={"event": "generate_failed", "session": session.id})
            self._fail(session, "generate_failed", f"target generation failed ({exc!r}); open a new session")

    def _draft(self, session: ServedSession, msg: pb.Draft) -> None:
        if session.target is None:
            self._fail(session, "no_session", "Draft before Open: this stream has no session; send Open first")
            return
        if self._draining.is_set():
            # Not queued: blocks sent after the signal are not in flight. The drain ends this session
            # with `draining` as soon as the blocks it had queued before are answered.
            return
        try:
            self.rate.take(session.client)
            block = convert.draft_from_pb(msg)
            check_draft(block, self.config.limits)
            if self.vocab_size is not None:  # every field in range before the block is queued
                admission.check_block(block, self.vocab_size, session.target.request.settings)
        except (LimitExceeded, Refused) as exc:
            self._fail(session, exc.code, exc.reason)
            return
        except ValueError as exc:  # ragged sparse q
            self._fail(session, "invalid_argument", f"round {msg.round}: {exc}")
            return
        self.scheduler.submit(session, block)

    # -- endings -------------------------------------------------------------------
    def _count_refusal(self, code: str, reason: str, client: str, peer: str, session: str = "") -> None:
        self.metrics.refusals.labels(code).inc()
        log.warning("refused", extra={"event": "refused", "code": code, "reason": reason, "client": client,
                                      "peer": peer, "session": session})

    def _fail(self, session: ServedSession, code: str, reason: str) -> None:
        self._count_refusal(code, reason, session.client, session.peer, session.id)
        session.fail(errors.exception_for(code, reason))
        self._cleanup(session)

    def _block_failed(self, session: ServedSession, error: Exception) -> None:
        """The scheduler's ``on_failed``: a refused block keeps its code, anything else is ``verify_failed``."""
        if isinstance(error, Refused):
            self._fail(session, error.code, error.reason)
            return
        log.warning("verification of one block failed", extra={
            "event": "verify_failed", "session": session.id, "error": repr(error)})
        self._fail(session, "verify_failed", f"verification failed ({error!r}); open a new session")

    def _release(self, session: ServedSession) -> None:
        self.kv_budget.release(session.id)
        self.metrics.kv_reserved_bytes.set(self.kv_budget.used_bytes)

    def _cleanup(self, session: ServedSession) -> None:
        session.end()
        self._release(session)
        if not self.store.remove(session):
            return
        self.metrics.streams.dec()
        self.scheduler.unregister(session)
        if session.target is not None:
            self.metrics.sessions_open.dec()
            try:
                with self.engine_lock:
                    self.engine.close_session(session.target)
            except Exception:
                log.exception("close failed", extra={"event": "close_failed", "session": session.id})
            log.info("session closed", extra={"event": "close", "session": session.id, "client": session.client})

    def _expire_idle(self) -> None:
        period = max(0.05, min(1.0, self.config.session_idle_s / 4))
        while not self._stopped.wait(period):
            for session in self.store.idle():
                self._fail(session, "session_expired", f"session {session.id} expired after "
                           f"{self.config.session_idle_s:g} s idle; open a new one")
            # Long sessions that ended left their caches in the allocator: give them back to the OS.
            if self.kv_budget.take_released() >= TRIM_AFTER_BYTES:
                return_free_memory()

    def drain(self, timeout_s: float, abandon: threading.Event | None = None) -> dict[str, int]:
        """Stop taking work, answer the blocks already in flight, then end every session with ``draining``.

        From the call on, new streams and Opens are refused with ``draining`` and new Drafts are not
        queued. A session with nothing queued or in a pass is ended at once; one with blocks in flight
        once their verdicts have gone out, or when ``timeout_s`` (or ``abandon``: a second signal)
        runs out. The drain never waits for the model itself: each stream's own thread frees its
        session's cache after telling the robot, and the process is about to exit anyway. Returns
        counts for the log: sessions ended after their blocks, and ended at the deadline.
        """
        self._draining.set()
        deadline = time.monotonic() + timeout_s
        ended = cut = 0
        while True:
            waiting = 0
            for session in self.store.all():
                if session.closed:
                    continue  # told already; its stream thread is cleaning up
                if self.scheduler.busy(session):
                    waiting += 1
                    continue
                self._tell_draining(session, DRAINING_REASON)
                ended += 1
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0 or (abandon is not None and abandon.is_set()):
                break
            self.scheduler.wait_for_progress(min(DRAIN_POLL_S, remaining))
        for session in self.store.all():
            if not session.closed:
                self._tell_draining(session, f"{DRAINING_REASON} (its blocks were not answered within the "
                                    f"{timeout_s:g} s drain deadline)")
                cut += 1
        self._stopped.set()
        self.scheduler.stop(timeout_s=0.0)
        return {"sessions_ended": ended, "sessions_cut_at_deadline": cut}

    def _tell_draining(self, session: ServedSession, reason: str) -> None:
        """End the session's stream with ``draining``; its stream thread then frees the session."""
        self._count_refusal("draining", reason, session.client, session.peer, session.id)
        session.fail(errors.exception_for("draining", reason))

    def shutdown(self) -> None:
        self._stopped.set()
        for session in self.store.all():
            if not session.closed:  # a drain has told the others already
                self._fail(session, "server_shutdown", "the server is shutting down; reconnect and open a new "
                           "session")
        if self._draining.is_set():
            return  # the drain had its deadline: it does not wait for the model, and has stopped the scheduler
        # Prefills stop at their next chunk; wait for the model's current chunk or pass to end.
        with self.engine_lock:
            pass
        self.scheduler.stop()
