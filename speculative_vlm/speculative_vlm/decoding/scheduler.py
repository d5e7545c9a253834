"""The batch scheduler: blocks from different sessions that arrive together share one target pass.

The one verification loop of the project: the in-process verifier (``decoding.inprocess``) and the
gRPC service (``cloud.service``) both run their sessions' blocks through a :class:`BatchScheduler`
over a :class:`~speculative_vlm.decoding.sessions.SessionStore`, so a robot sees the same batching,
the same order and the same failures over either. Used as::

    scheduler = BatchScheduler(engine, store, max_batch=8, max_wait_s=0.002, on_failed=fail)
    scheduler.register(session)          # an open SPECULATIVE session: its blocks are verified
    scheduler.submit(session, block)     # returns at once; verdicts go to session's outbox
    scheduler.unregister(session)        # closed: whatever it had queued is dropped
    scheduler.stop()

One thread owns verification. It waits for a first pending block, then gives other sessions up
to ``max_wait_s`` (from the moment the target is free) to join; it stops waiting as soon as the
batch is full or every registered session already has a block waiting, since nobody else could
join (so ``max_wait_s=0``, the in-process default, never waits). The oldest blocks go first, at
most ``max_batch`` of them, in one ``engine.verify`` call. Each session has at most one block in a
pass, so a session's pipelined blocks are verified in order, each after the previous one's final
verdict: the engine then verifies it if its assumed prefix holds and drops it otherwise. Early
verdicts go to their session's outbox the moment the exit layer fires, final ones when the pass
ends. One bad block fails only its own session: the engine verifies a batch transactionally per
item (an item that fails comes back as its exception, and every other item is exactly as if it
had not been batched with it), so nothing is ever retried; the failure goes to ``on_failed``
(the owner decides what the client is told and frees the session).

A scheduler that can no longer verify is *broken*: its thread died, or a pass raised as a whole
(a bug, or a device in a state no single item explains; a CUDA error, for one, poisons the
context). It keeps answering what it can, but tells its watchers (:meth:`watch`: the server
turns health to NOT_SERVING, so a load balancer or an orchestrator takes it out).

Whoever measures the verifier passes ``on_pass``: it gets a :class:`PassRecord` of every pass
(what waited how long, what came out, which early verdicts went out) before the pass's final
verdicts are sent.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from speculative_vlm.decoding.sessions import ServedSession, SessionStore
from speculative_vlm.decoding.target_engine import TargetEngine, TargetSession
from speculative_vlm.decoding.verifier import DraftBlock, InvalidArgument, Refused, Verdict, VerdictKind

log = logging.getLogger("speculative_vlm.decoding.scheduler")


@dataclass(frozen=True)
class PassItem:
    """One block of a pass, as ``on_pass`` sees it."""

    session: ServedSession
    block: DraftBlock
    waited_s: float  # from the block's arrival to the start of its pass
    result: Verdict | Exception  # FINAL or DROPPED, or the exception that failed this item
    early: tuple[Verdict, ...]  # the early verdicts sent for it during the pass
    first_output: bool  # this final verdict is the session's first output


@dataclass(frozen=True)
class PassRecord:
    items: tuple[PassItem, ...]
    seconds: float  # the pass's own time


class BatchScheduler:
    """Batches the blocks of a :class:`SessionStore`'s sessions into target passes (see the module docstring).

    ``engine_lock`` is held around each pass (the service shares the model with its prefills
    through it); ``on_failed(session, error)`` is told of every block that failed, with the
    engine's own exception; ``on_pass(record)`` of every pass.
    """

    def __init__(self, engine: TargetEngine, store: SessionStore, *, max_batch: int, max_wait_s: float = 0.0,
                 on_failed: Callable[[ServedSession, Exception], None],
                 engine_lock: AbstractContextManager[Any] | None = None,
                 on_pass: Callable[[PassRecord], None] | None = None):
        self.engine = engine
        self.store = store
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max_wait_s
        self.engine_lock = engine_lock if engine_lock is not None else contextlib.nullcontext()
        self._on_failed = on_failed
        self._on_pass = on_pass
        self._cond = threading.Condition()
        self._stopped = False
        self.passes = 0
        self.largest_batch = 0
        self._in_pass: set[ServedSession] = set()  # sessions with a block in the pass running now
        self.broken: str | None = None  # why verification failed for good; None while it works
        self._watchers: list[Callable[[str], None]] = []
        self._thread = threading.Thread(target=self._run, daemon=True, name="batch-scheduler")
        self._thread.start()

    # -- called from the sessions' threads -----------------------------------------
    def register(self, session: ServedSession) -> None:
        """Verify ``session``'s blocks from now on (an open SPECULATIVE session)."""
        with self._cond:
            session.speculative = True
            self._cond.notify_all()

    def unregister(self, session: ServedSession) -> None:
        """Stop verifying ``session``'s blocks and drop the ones it has queued."""
        with self._cond:
            session.speculative = False
            session.pending.clear()
            self._cond.notify_all()

    def submit(self, session: ServedSession, block: DraftBlock) -> None:
        """Queue ``block`` for verification; a session that verifies no drafts is failed instead.

        An AUTOREGRESSIVE session is never registered: its drafts would wait forever (and a
        session with pending blocks never expires).
        """
        if not self._thread.is_alive() and not self._stopped:  # nobody would ever answer the block
            self._on_failed(session, Refused("verify_failed", f"this verifier cannot verify any more "
                                             f"({self.broken}); open a session on another verifier"))
            return
        with self._cond:
            active = session.speculative
            if active:
                session.pending.append((block, time.monotonic()))
                self._cond.notify_all()
        if not active and not session.closed:
            self._on_failed(session, InvalidArgument(
                "invalid_argument", "draft: this session verifies no drafts (it was opened AUTOREGRESSIVE, the "
                "cloud generates alone); open a SPECULATIVE session to send drafts"))

    def watch(self, on_broken: Callable[[str], None]) -> None:
        """Call ``on_broken(reason)`` once the scheduler breaks (at once if it already has)."""
        with self._cond:
            self._watchers.append(on_broken)
            broken = self.broken
        if broken is not None:
            on_broken(broken)

    def _break(self, reason: str) -> None:
        with self._cond:
            if self.broken is not None:
                return
            self.broken = reason
            watchers = list(self._watchers)
        log.error("the batch scheduler is broken", extra={"event": "scheduler_broken", "reason": reason})
        for on_broken in watchers:
            on_broken(reason)

    def busy(self, session: ServedSession) -> bool:
        """Whether ``session`` has a block queued or in the pass running now (a drain waits for it)."""
        with self._cond:
            return bool(session.pending) or session in self._in_pass

    def wait_for_progress(self, timeout_s: float) -> None:
        """Wait until a pass ends, a block is queued or a session leaves (or ``timeout_s``)."""
        with self._cond:
            self._cond.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)

    # -- the verification thread ---------------------------------------------------
    def _ready(self) -> list[ServedSession]:
        return [s for s in self.store.speculative() if s.pending]

    def _next_batch(self) -> list[tuple[ServedSession, DraftBlock, float]] | None:
        free_at = time.monotonic()
        with self._cond:
            if self._in_pass:  # the previous pass has answered its sessions
                self._in_pass.clear()
                self._cond.notify_all()
            while not self._stopped and not self._ready():
                self._cond.wait()
            if self._stopped:
                return None
            # The wait is counted from when the target could have started this pass: blocks
            # that queued up during the previous pass still wait for the sessions that pass
            # just answered (they come back after drafting), but never longer than max_wait.
            deadline = max(free_at, min(s.pending[0][1] for s in self._ready())) + self.max_wait_s
            while not self._stopped:
                ready = self._ready()
                everyone_waiting = len(ready) == len(self.store.speculative())
                remaining = deadline - time.monotonic()
                if len(ready) >= self.max_batch or everyone_waiting or remaining <= 0:
                    break
                self._cond.wait(remaining)
            ready = sorted(self._ready(), key=lambda s: s.pending[0][1])[: self.max_batch]
            batch = []
            for s in ready:
                block, arrived = s.pending.popleft()
                batch.append((s, block, arrived))
                self._in_pass.add(s)
            return batch

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if batch:
                    try:
                        self._verify(batch)
                    except Exception as exc:  # later batches may still verify, but the verifier is not healthy
                        log.exception("verification thread error", extra={"event": "scheduler_error"})
                        self._break(f"a verification pass raised {exc!r}")
        except BaseException as exc:
            log.exception("the verification thread died", extra={"event": "scheduler_died"})
            self._break(f"the verification thread died ({exc!r})")
            if not isinstance(exc, Exception):
                raise

    def _verify(self, batch: list[tuple[ServedSession, DraftBlock, float]]) -> None:
        # A session may have closed (client gone, expired) since its block was queued.
        batch = [item for item in batch if not item[0].closed]
        if not batch:
            return
        by_target = {id(s.target): s for s, _, _ in batch}
        early: dict[int, list[Verdict]] = {}  # by id(target)

        def on_early(target: TargetSession, verdict: Verdict) -> None:
            session = by_target.get(id(target))
            if session is not None:
                session.send(verdict)
                early.setdefault(id(target), []).append(verdict)

        start = time.monotonic()
        try:
            with self.engine_lock:
                outcomes: list[Verdict | Exception] = self.engine.verify(
                    [(s.target, b) for s, b, _ in batch], on_early)
        except Exception as exc:  # not one item's failure (those come back in their place): a bug
            log.exception("verification pass failed", extra={"event": "verify_error", "batch": len(batch)})
            outcomes = [exc] * len(batch)
            self._break(f"a verification pass raised {exc!r}")
        elapsed = time.monotonic() - start
        self.passes += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        items = []
        for (session, block, arrived), result in zip(batch, outcomes, strict=True):
            first = isinstance(result, Verdict) and result.kind is VerdictKind.FINAL and session.first_output is None
            if first:
                session.first_output = time.monotonic()
            items.append(PassItem(session, block, start - arrived, result, tuple(early.get(id(session.target), ())),
                                  first))
        if self._on_pass is not None:
            self._on_pass(PassRecord(tuple(items), elapsed))
        for item in items:
            if isinstance(item.result, Exception):
                if not item.session.closed:  # else it closed during the pass; nobody waits for this verdict
                    self._on_failed(item.session, item.result)
                continue
            item.session.touch()  # a long pass must not make its session look idle
            item.session.send(item.result)
