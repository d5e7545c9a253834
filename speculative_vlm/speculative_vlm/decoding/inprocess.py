"""An in-process :class:`Verifier` over a :class:`TargetEngine`: a worker thread and queues.

Blocks are queued per session and verified by one worker that batches the heads of all
sessions' queues into one pass, exactly as the cloud server does; early verdicts are
queued from inside the pass, so the drafter sees them before the pass ends.

``open_autoregressive`` is the cloud-autoregressive mode, as the gRPC client offers it: the target
generates alone and the session hands its tokens out one by one (computed in the caller's thread).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from dataclasses import dataclass

from speculative_vlm.decoding.target_engine import TargetEngine, TargetSession
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
    def __init__(self, owner: InProcessVerifier, target: TargetSession):
        self._owner = owner
        self.target = target
        self.session_id = target.session_id
        self.verdicts: queue.Queue = queue.Queue()
        self.pending: deque[DraftBlock] = deque()
        self.closed = False

    def submit(self, block: DraftBlock) -> None:
        if self.closed:
            raise SessionNotFound(f"session {self.session_id} is closed; open a new one")
        self._owner._enqueue(self, block)

    def next_verdict(self, timeout: float | None = None) -> Verdict:
        try:
            item = self.verdicts.get(timeout=timeout)
        except queue.Empty:
            raise VerifierTimeout(f"no verdict from session {self.session_id} within {timeout} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._owner._close(self)


@dataclass(frozen=True)
class StreamedToken:
    """One token of an autoregressive session (the fields of the wire's Token message)."""

    index: int
    token: int  # -1: none (the end marker)
    eos: bool


class InProcessStream:
    """A cloud-autoregressive session: the target alone, one token per ``next_token`` call."""

    opened = None  # no wire: nothing to report about the open

    def __init__(self, owner: InProcessVerifier, target: TargetSession):
        self._owner = owner
        self.target = target
        self.session_id = target.session_id
        self._tokens = owner.engine.generate(target)
        self._index = 0
        self.closed = False

    def next_token(self, timeout: float | None = None) -> StreamedToken:
        if self.closed:
            raise SessionNotFound(f"session {self.session_id} is closed; open a new one")
        token = next(self._tokens, None)
        if token is None:
            return StreamedToken(self._index, -1, True)
        self._index += 1
        return StreamedToken(self._index - 1, int(token), False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._owner.engine.close_session(self.target)


class InProcessVerifier(Verifier):
    def __init__(self, engine: TargetEngine):
        self.engine = engine
        self._cv = threading.Condition()
        self._sessions: dict[str, InProcessSession] = {}
        self._stopping = False
        self._rr = itertools.count()
        self._worker = threading.Thread(target=self._run, name="inprocess-verifier", daemon=True)
        self._worker.start()

    def open(self, request: SessionRequest) -> InProcessSession:
        session = InProcessSession(self, self.engine.open_session(request))
        with self._cv:
            self._sessions[session.session_id] = session
        return session

    def open_autoregressive(self, request: SessionRequest) -> InProcessStream:
        """A session in which the target generates alone (cloud autoregressive); read it with ``next_token``."""
        return InProcessStream(self, self.engine.open_session(request))

    def _enqueue(self, session: InProcessSession, block: DraftBlock) -> None:
        with self._cv:
            session.pending.append(block)
            self._cv.notify()

    def _close(self, session: InProcessSession) -> None:
        with self._cv:
            self._sessions.pop(session.session_id, None)
            session.pending.clear()
        self.engine.close_session(session.target)

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._worker.join(timeout=10)
        for s in list(self._sessions.values()):
            s.close()

    def __enter__(self) -> InProcessVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not any(s.pending for s in self._sessions.values()):
                    self._cv.wait()
                if self._stopping:
                    return
                ready = [s for s in self._sessions.values() if s.pending]
                # Rotate the start so no session waits behind the others when over max_batch.
                shift = next(self._rr) % len(ready)
                ready = (ready[shift:] + ready[:shift])[: self.engine.max_batch]
                batch = [(s, s.pending.popleft()) for s in ready]
            by_target = {id(s.target): s for s, _ in batch}

            def on_early(target: TargetSession, verdict: Verdict, by_target=by_target) -> None:
                by_target[id(target)].verdicts.put(verdict)

            # The engine isolates items: a bad block fails its own session only (its exception
            # comes back in its place), never the batch.
            try:
                results = self.engine.verify([(s.target, b) for s, b in batch], on_early=on_early)
            except Exception as exc:  # a bug must reach the caller, not kill the worker silently
                results = [exc] * len(batch)
            for (s, _), result in zip(batch, results, strict=True):
                s.verdicts.put(result)
