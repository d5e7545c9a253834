"""The batch scheduler: blocks from different sessions that arrive together share one pass.

One thread owns verification. It waits for a first pending block, then gives other
sessions up to ``max_wait_s`` (from the moment the target is free) to join (it stops
waiting as soon as the batch is full or every active session already has a block
waiting, since nobody else could join), and
verifies the batch in one ``engine.verify`` call. Each session has at most one block in a
pass, so a session's pipelined blocks are verified in order, each after the previous
one's final verdict: the engine then verifies it if its assumed prefix holds and drops it
otherwise. Early verdicts go to their session's stream the moment the exit layer fires.
One bad block fails only its own session: the engine verifies a batch transactionally per
item (an item that fails comes back as its exception, and every other item is exactly as
if it had not been batched with it), so nothing is ever retried.

A scheduler that can no longer verify is *broken*: its thread died, or a pass raised as a
whole (a bug, or a device in a state no single item explains; a CUDA error, for one, poisons
the context). It keeps answering what it can, but tells its watchers (:meth:`watch`: the
server turns health to NOT_SERVING, so a load balancer or an orchestrator takes it out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from speculative_vlm.cloud.metrics import ServerMetrics
from speculative_vlm.cloud.sessions import ServerSession
from speculative_vlm.decoding.verifier import DraftBlock, Refused, Verdict, VerdictKind
from speculative_vlm.protocol import convert

log = logging.getLogger("speculative_vlm.cloud.scheduler")


class BatchScheduler:
    def __init__(self, engine: Any, max_batch: int, max_wait_s: float, metrics: ServerMetrics,
                 engine_lock: threading.Lock, on_failed: Callable[[ServerSession, str, str], None]):
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        # Prefill, verification and close all use the model: one at a time.
        self.engine_lock = engine_lock
        self._on_failed = on_failed
        self._cond = threading.Condition()
        self._active: set[ServerSession] = set()
        self._stopped = False
        self.passes = 0
        self.largest_batch = 0
        self._in_pass: set[ServerSession] = set()  # sessions with a block in the pass running now
        self.broken: str | None = None  # why verification failed for good; None while it works
        self._watchers: list[Callable[[str], None]] = []
        self._thread = threading.Thread(target=self._run, daemon=True, name="batch-scheduler")
        self._thread.start()

    # -- called from stream threads ------------------------------------------------
    def register(self, session: ServerSession) -> None:
        with self._cond:
            self._active.add(session)

    def unregister(self, session: ServerSession) -> None:
        with self._cond:
            self._active.discard(session)
            session.pending.clear()
            self._cond.notify_all()

    def submit(self, session: ServerSession, block: DraftBlock) -> None:
        """Queue ``block`` for verification; a session that verifies no drafts is refused instead.

        An AUTOREGRESSIVE session is never registered: its drafts would wait forever (and a
        session with pending blocks never expires).
        """
        if not self._thread.is_alive() and not self._stopped:  # nobody would ever answer the block
            self._on_failed(session, "verify_failed", f"this verifier cannot verify any more ({self.broken}); "
                            "open a session on another verifier")
            return
        with self._cond:
            active = session in self._active
            if active:
                session.pending.append((block, time.monotonic()))
                self._cond.notify_all()
        if not active and not session.closed:
            self._on_failed(session, "invalid_argument", "draft: this session verifies no drafts (it was opened "
                            "AUTOREGRESSIVE, the cloud generates alone); open a SPECULATIVE session to send drafts")

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
        self.metrics.scheduler_up.set(0)
        log.error("the batch scheduler is broken", extra={"event": "scheduler_broken", "reason": reason})
        for on_broken in watchers:
            on_broken(reason)

    def busy(self, session: ServerSession) -> bool:
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
    def _ready(self) -> list[ServerSession]:
        return [s for s in self._active if s.pending and not s.closed]

    def _next_batch(self) -> list[tuple[ServerSession, DraftBlock, float]] | None:
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
                everyone_waiting = len(ready) == len([s for s in self._active if not s.closed])
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
                    except Exception as exc:  # later batches may still verify, but the server is not healthy
                        log.exception("verification thread error", extra={"event": "scheduler_error"})
                        self._break(f"a verification pass raised {exc!r}")
        except BaseException as exc:
            log.exception("the verification thread died", extra={"event": "scheduler_died"})
            self._break(f"the verification thread died ({exc!r})")
            if not isinstance(exc, Exception):
                raise

    def _verify(self, batch: list[tuple[ServerSession, DraftBlock, float]]) -> None:
        # A session may have closed (client gone, expired) since its block was queued.
        batch = [item for item in batch if not item[0].closed]
        if not batch:
            return
        by_target = {id(s.target): s for s, _, _ in batch}
        early: dict[int, list[Verdict]] = {}  # by id(target): judged against the final verdict below

        def on_early(target: Any, verdict: Verdict) -> None:
            session = by_target.get(id(target))
            if session is not None:
                session.send(convert.verdict_to_pb(verdict))
                early.setdefault(id(target), []).append(verdict)
                self.metrics.early_verdicts.labels(str(verdict.exit_layer)).inc()

        start = time.monotonic()
        for _, _, arrived in batch:
            self.metrics.queue_wait.observe(start - arrived)
        try:
            with self.engine_lock:
                outcomes: list[Verdict | Exception] = self.engine.verify(
                    [(s.target, b) for s, b, _ in batch], on_early)
        except Exception as exc:  # not one item's failure (those come back in their place): a bug
            log.exception("verification pass failed", extra={"event": "verify_error", "batch": len(batch)})
            outcomes = [exc] * len(batch)
            self._break(f"a verification pass raised {exc!r}")
        results = list(zip((s for s, _, _ in batch), outcomes, strict=True))
        elapsed = time.monotonic() - start
        self.passes += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        self.metrics.batch_size.observe(len(batch))
        self.metrics.verify_latency.observe(elapsed)
        self.metrics.accepted_per_pass.observe(
            sum(r.accepted for _, r in results if isinstance(r, Verdict) and r.kind is VerdictKind.FINAL))
        for (session, block, _), result in zip(batch, outcomes, strict=True):
            if isinstance(result, Exception):
                if session.closed:
                    continue  # it closed during the pass; nobody is waiting for this verdict
                code = result.code if isinstance(result, Refused) else "verify_failed"
                reason = result.reason if isinstance(result, Refused) else \
                    f"verification failed ({result!r}); open a new session"
                if not isinstance(result, Refused):
                    log.warning("verification of one block failed", extra={
                        "event": "verify_failed", "session": session.id, "error": repr(result)})
                self._on_failed(session, code, reason)
                continue
            if result.kind is VerdictKind.FINAL:
                self.metrics.rounds_total.labels("verified").inc()
                self.metrics.accepted_tokens.observe(result.accepted)
                self.metrics.observe_verified(len(block.tokens), result.accepted)
                for verdict in early.get(id(session.target), ()):
                    self.metrics.observe_early(verdict.exit_layer, verdict.accepted == result.accepted
                                               and verdict.token == result.token)
                if session.first_output is None:
                    session.first_output = time.monotonic()
                    self.metrics.time_to_first_token.labels("speculative").observe(
                        session.first_output - session.open_received)
            else:
                self.metrics.rounds_total.labels("dropped").inc()
            session.touch()  # a long pass must not make its session look idle
            session.send(convert.verdict_to_pb(result))
