"""The verifier's sessions: one store of every session it serves, whatever the transport.

A :class:`ServedSession` is one session as the verifier side sees it: the engine's
:class:`~speculative_vlm.decoding.target_engine.TargetSession` once prefilled, the draft blocks
waiting for the :class:`~speculative_vlm.decoding.scheduler.BatchScheduler`, and an *outbox*: the
session's events for its client, in order, as the engine's own types (:class:`Opened`,
:class:`~speculative_vlm.decoding.verifier.Verdict`, :class:`StreamedToken`, and last, if the
session failed, the exception that ended it: a
:class:`~speculative_vlm.decoding.verifier.VerifierError` with its code, or the engine's own).
Whoever reads the outbox converts each event once, at its own boundary: the in-process verifier
hands them to the loop as they are, the gRPC service (``cloud.service``) turns them into protocol
messages (``protocol.convert``).

The :class:`SessionStore` holds them by id. The gRPC service counts a stream as a session from
its first byte (so streams that never open cannot take every RPC slot: :meth:`SessionStore.admit`
refuses past the server's and the client's limits) and expires open sessions left idle
(:meth:`SessionStore.idle`), so a robot that vanished without closing does not hold target memory
forever; the in-process verifier adds a session once it is prefilled. The scheduler reads the
store to find the blocks to batch::

    store = SessionStore(idle_s=30.0)
    session = ServedSession(client="robot-1")
    store.admit(session, max_total=64, max_per_client=4)   # raises LimitExceeded past either
    ...                                                    # prefill, then session.attach(target)
    session.send(verdict)                                  # to the client, in order
    session.fail(Refused("verify_failed", "..."))          # the last event; ends the session
    store.remove(session)

Nothing here imports a transport: no gRPC, no protobuf, no ROS.
"""

from __future__ import annotations

import enum
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from speculative_vlm.decoding.verifier import DraftBlock, LimitExceeded, Verdict

if TYPE_CHECKING:  # the robot's client reads Opened and StreamedToken from here without loading torch
    from speculative_vlm.decoding.target_engine import TargetSession

_ids = itertools.count(1)


class Stage(enum.Enum):
    CONNECTED = 0  # the stream is up, no Open yet: the open timeout runs
    OPENING = 1  # Open admitted, the prompt is being prefilled
    OPEN = 2  # prefilled: drafts are verified, the idle timeout runs


@dataclass(frozen=True)
class Opened:
    """What opening a session reports to its client (the fields of the wire's ``Opened``)."""

    session_id: str
    prefill_time_s: float = 0.0  # the verifier's prompt prefill, s; the rest of the open is the link
    target_model: str = ""
    exit_layers: tuple[int, ...] = ()
    vocab_size: int = 0
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class StreamedToken:
    """One token of an autoregressive session (the cloud generates alone)."""

    index: int
    token: int  # -1: none (the end marker)
    eos: bool


# What a session's outbox holds, in order; None (after the last) ends the stream.
Event = Opened | Verdict | StreamedToken | Exception


@dataclass(eq=False)
class ServedSession:
    """One session on the verifier: its target, its queued blocks, its outbox (see the module docstring)."""

    client: str = ""
    peer: str = ""
    target: TargetSession | None = None  # the engine's session once prefilled
    id: str = field(default_factory=lambda: f"s{next(_ids)}")
    outbox: queue.Queue[Event | None] = field(default_factory=queue.Queue)
    # Blocks waiting for verification, with when each arrived (guarded by the scheduler).
    pending: deque[tuple[DraftBlock, float]] = field(default_factory=deque)
    # The scheduler verifies this session's blocks (registered): a SPECULATIVE session once open.
    speculative: bool = False
    stage: Stage = Stage.CONNECTED
    started: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    # For the time to first token: when Open arrived, and when the first output token went out.
    open_received: float = 0.0
    first_output: float | None = None
    closed: bool = False
    error: Exception | None = None  # what ended the session, if it failed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def send(self, event: Event) -> None:
        """Queue ``event`` for the client (nothing once the session has ended)."""
        if not self.closed:
            self.outbox.put(event)

    def end(self, event: Event | None = None) -> None:
        """Send a last event (if any) and end the session's stream; idempotent."""
        with self._lock:
            if self.closed:
                return
            if event is not None:
                self.outbox.put(event)
            self.closed = True
            self.outbox.put(None)

    def fail(self, error: Exception) -> None:
        """End the session with ``error`` as its last event (the first failure wins)."""
        with self._lock:
            if self.closed:
                return
            self.error = error
        self.end(error)

    def attach(self, target: TargetSession) -> bool:
        """Hold the prefilled engine session; False (and nothing held) if the session has ended.

        Under the same lock as :meth:`end`, so a session that ends during its prefill either
        sees the target (and closes it) or the opener sees the end (and closes it): never neither.
        """
        with self._lock:
            if self.closed:
                return False
            self.target = target
            self.stage = Stage.OPEN
            return True


class SessionStore:
    """Every session of one verifier, by id; thread-safe. ``idle_s``: when an open session expires."""

    def __init__(self, idle_s: float = float("inf")):
        self.idle_s = idle_s
        self._sessions: dict[str, ServedSession] = {}
        self._lock = threading.Lock()

    def add(self, session: ServedSession) -> None:
        with self._lock:
            self._sessions[session.id] = session

    def admit(self, session: ServedSession, max_total: int, max_per_client: int) -> None:
        """Add a new session unless the verifier or its client already holds its limit; raises LimitExceeded."""
        with self._lock:
            mine = sum(1 for s in self._sessions.values() if s.client == session.client)
            if mine >= max_per_client:
                raise LimitExceeded("too_many_sessions", f"client {session.client!r} already holds "
                                    f"{mine} streams (sessions open or opening; the limit is "
                                    f"{max_per_client}); close one, and send Open promptly on a new stream")
            if len(self._sessions) >= max_total:
                raise LimitExceeded("server_full", f"the server holds its limit of {max_total} sessions; "
                                    "retry later or use another replica")
            self._sessions[session.id] = session

    def remove(self, session: ServedSession) -> bool:
        """Forget ``session``; False when it was not here (removed already)."""
        with self._lock:
            return self._sessions.pop(session.id, None) is not None

    def get(self, session_id: str) -> ServedSession | None:
        with self._lock:
            return self._sessions.get(session_id)

    def count_for(self, client: str) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.client == client)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def all(self) -> list[ServedSession]:
        with self._lock:
            return list(self._sessions.values())

    def speculative(self) -> list[ServedSession]:
        """The sessions whose blocks the scheduler verifies, not ended."""
        with self._lock:
            return [s for s in self._sessions.values() if s.speculative and not s.closed]

    def idle(self, now: float | None = None) -> list[ServedSession]:
        """Open sessions idle for longer than ``idle_s``; they have nothing pending."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [s for s in self._sessions.values()
                    if s.stage is Stage.OPEN and now - s.last_active > self.idle_s and not s.pending]

    def count(self, stage: Stage) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.stage is stage)
