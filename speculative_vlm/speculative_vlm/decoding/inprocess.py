"""An in-process :class:`Verifier` over a :class:`TargetEngine`: the verification core without a wire.

The same core as the cloud's gRPC service: sessions live in a
:class:`~speculative_vlm.decoding.sessions.SessionStore` and one
:class:`~speculative_vlm.decoding.scheduler.BatchScheduler` thread batches the heads of every
session's queue into one pass, as the server does (by default without waiting for late
blocks: ``max_wait_s`` 0). Early verdicts reach the session's outbox from inside the pass, so
the drafter sees them before the pass ends. Events are handed to the loop as they are (no
conversion): verdicts, and a failed block's own exception (``InvalidArgument``, ...)::

    with InProcessVerifier(TargetEngine(target, exit_layers=[12])) as verifier:
        result = SpeculativeDecoder(draft, verifier).generate(request)

``open_autoregressive`` is the cloud-autoregressive mode, as the gRPC client offers it: the target
generates alone and the session hands its tokens out one by one (computed in the caller's thread).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

from speculative_vlm.decoding.scheduler import BatchScheduler
from speculative_vlm.decoding.sessions import ServedSession, SessionStore, StreamedToken
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    SessionNotFound,
    SessionRequest,
    Verdict,
    Verifier,
    VerifierSession,
    VerifierTimeout,
)


class InProcessSession(VerifierSession):
    """A SPECULATIVE session: blocks to the scheduler, verdicts from the session's outbox."""

    def __init__(self, owner: InProcessVerifier, served: ServedSession):
        self._owner = owner
        self.served = served
        self.target = served.target
        self.session_id = served.id

    def submit(self, block: DraftBlock) -> None:
        if self.served.closed:
            raise self._ended()
        self._owner.scheduler.submit(self.served, block)

    def next_verdict(self, timeout: float | None = None) -> Verdict:
        try:
            event = self.served.outbox.get(timeout=timeout)
        except queue.Empty:
            raise VerifierTimeout(f"no verdict from session {self.session_id} within {timeout} s") from None
        if event is None:  # ended: every later call fails the same way
            self.served.outbox.put(None)
            raise self._ended()
        if isinstance(event, BaseException):
            raise event
        if not isinstance(event, Verdict):
            raise TypeError(f"session {self.session_id}: {event!r} in a speculative session's outbox")
        return event

    def _ended(self) -> Exception:
        return self.served.error or SessionNotFound(f"session {self.session_id} is closed; open a new one")

    def close(self) -> None:
        self._owner._close(self.served)


class InProcessStream:
    """A cloud-autoregressive session: the target alone, one token per ``next_token`` call."""

    opened = None  # no wire: nothing to report about the open

    def __init__(self, owner: InProcessVerifier, served: ServedSession):
        self._owner = owner
        self.served = served
        self.target = served.target
        self.session_id = served.id
        self._tokens: Iterator[int] = owner.engine.generate(served.target)
        self._index = 0

    @property
    def closed(self) -> bool:
        return self.served.closed

    def next_token(self, timeout: float | None = None) -> StreamedToken:
        if self.served.closed:
            raise SessionNotFound(f"session {self.session_id} is closed; open a new one")
        token = next(self._tokens, None)
        if token is None:
            return StreamedToken(self._index, -1, True)
        self._index += 1
        return StreamedToken(self._index - 1, int(token), False)

    def close(self) -> None:
        self._owner._close(self.served)


class InProcessVerifier(Verifier):
    """A verifier in this process: ``engine`` verifies, the core (store + scheduler) serves its sessions."""

    def __init__(self, engine: TargetEngine, max_wait_s: float = 0.0):
        self.engine = engine
        self.store = SessionStore()
        self.scheduler = BatchScheduler(engine, self.store, max_batch=engine.max_batch, max_wait_s=max_wait_s,
                                        on_failed=lambda session, error: session.fail(error))

    def _served(self, request: SessionRequest) -> ServedSession:
        served = ServedSession(client="in-process")
        served.attach(self.engine.open_session(request))  # bad input raises here, typed
        self.store.add(served)
        return served

    def open(self, request: SessionRequest) -> InProcessSession:
        served = self._served(request)
        self.scheduler.register(served)
        return InProcessSession(self, served)

    def open_autoregressive(self, request: SessionRequest) -> InProcessStream:
        """A session in which the target generates alone (cloud autoregressive); read it with ``next_token``."""
        return InProcessStream(self, self._served(request))

    def _close(self, served: ServedSession) -> None:
        """End ``served`` and free its target; idempotent."""
        served.end()
        if not self.store.remove(served):
            return
        self.scheduler.unregister(served)
        self.engine.close_session(served.target)

    def shutdown(self) -> None:
        self.scheduler.stop(timeout_s=10)
        for served in self.store.all():
            self._close(served)

    def __enter__(self) -> InProcessVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
