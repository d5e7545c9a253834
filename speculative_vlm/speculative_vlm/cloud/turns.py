"""Turns on the target model: verification passes first, prefill chunks in between.

The model runs one thing at a time. Verification passes, autoregressive steps and session
closes take an *urgent* turn (``with turns:``); each chunk of a prompt's prefill takes a
*background* turn (``with turns.background():``). Urgent work that was waiting when a chunk
ended all goes before the next chunk; urgent work that arrives later waits for at most one
chunk; and after urgent work a waiting chunk goes next. So a verification pass waits for one
prefill chunk at most, however long the prompts, and prefills still advance a chunk between
passes, however busy the verifier. A plain lock gives neither: whoever releases it tends to
take it back, and waiters are served in no particular order.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ModelTurns:
    """``observe_wait`` is told how long each urgent turn waited for the model (seconds)."""

    def __init__(self, observe_wait: Callable[[float], None] | None = None) -> None:
        self._observe_wait = observe_wait
        self._cond = threading.Condition()
        self._busy = False
        self._tickets = itertools.count(1)
        self._urgent: set[int] = set()  # tickets of the urgent work waiting
        self._ahead_of_chunk = 0  # urgent tickets up to this one go before the next chunk
        self._background_waiting = 0
        self._last_urgent = False

    def _chunk_may_go(self) -> bool:
        urgent_first = any(t <= self._ahead_of_chunk for t in self._urgent)
        return not urgent_first and (not self._urgent or self._last_urgent)

    # -- urgent turns: `with turns:` (the scheduler uses it as its engine lock) ---------------
    def acquire(self) -> None:
        asked = time.monotonic()
        with self._cond:
            ticket = next(self._tickets)
            self._urgent.add(ticket)
            # A chunk is waiting and urgent work just ran: only work that waited through the last chunk
            # goes before it.
            while self._busy or (ticket > self._ahead_of_chunk and self._background_waiting
                                 and self._last_urgent):
                self._cond.wait()
            self._urgent.discard(ticket)
            self._busy = True
            self._last_urgent = True
        if self._observe_wait is not None:
            self._observe_wait(time.monotonic() - asked)

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def __enter__(self) -> ModelTurns:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- background turns: one prefill chunk each ---------------------------------------------
    @contextmanager
    def background(self) -> Iterator[None]:
        with self._cond:
            self._background_waiting += 1
            while self._busy or not self._chunk_may_go():
                self._cond.wait()
            self._background_waiting -= 1
            self._busy = True
            self._last_urgent = False
        try:
            yield
        finally:
            with self._cond:
                # Everything urgent that waited through this chunk goes before the next one.
                self._ahead_of_chunk = max(self._urgent, default=self._ahead_of_chunk)
                self._busy = False
                self._cond.notify_all()
