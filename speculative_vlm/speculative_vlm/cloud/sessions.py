"""The server's sessions: one per stream, from the moment it starts, with its engine state
and its outbox.

A stream is a session from its first byte: it counts against its client's share and the
server's total before it has sent Open (so streams that never open cannot take every RPC
slot), and one that does not send Open within the open timeout is ended. An open session is
touched whenever its client sends something; one idle longer than the configured time is
expired (its KV cache freed, its stream ended with an Error), so a robot that vanished
without closing does not hold target memory forever.
"""

from __future__ import annotations

import enum
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from speculative_vlm.cloud.limits import LimitExceeded
from speculative_vlm.decoding.verifier import DraftBlock
from speculative_vlm.protocol import convert
from speculative_vlm.protocol import verifier_pb2 as pb

_ids = itertools.count(1)


class Stage(enum.Enum):
    CONNECTED = 0  # the stream is up, no Open yet: the open timeout runs
    OPENING = 1  # Open admitted, the prompt is being prefilled
    OPEN = 2  # prefilled: drafts are verified, the idle timeout runs


@dataclass(eq=False)
class ServerSession:
    client: str
    peer: str
    target: Any = None  # the engine's TargetSession once prefilled
    id: str = field(default_factory=lambda: f"s{next(_ids)}")
    # Messages for the client, in order; None ends the stream.
    outbox: queue.Queue[pb.ServerMessage | None] = field(default_factory=queue.Queue)
    # Blocks waiting for verification, in order of arrival (guarded by the scheduler).
    pending: deque[tuple[DraftBlock, float]] = field(default_factory=deque)
    stage: Stage = Stage.CONNECTED
    started: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    # For the time to first token: when Open arrived, and when the first output token went out.
    open_received: float = 0.0
    first_output: float | None = None
    closed: bool = False
    refusal: tuple[str, str] | None = None  # (code, reason) the stream was refused with
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def send(self, message: pb.ServerMessage) -> None:
        if not self.closed:
            self.outbox.put(message)

    def end(self, message: pb.ServerMessage | None = None) -> None:
        """Send a last message (if any) and end the stream; idempotent."""
        with self._lock:
            if self.closed:
                return
            if message is not None:
                self.outbox.put(message)
            self.closed = True
            self.outbox.put(None)

    def refuse(self, code: str, reason: str) -> None:
        """End the stream with an Error; the service then ends the RPC with the code's gRPC status."""
        with self._lock:
            if self.closed:
                return
            self.refusal = (code, reason)
        self.end(convert.error(code, reason))

    def attach(self, target: Any) -> bool:
        """Hold the prefilled engine session; False (and nothing held) if the stream has ended.

        Under the same lock as :meth:`end`, so a stream that ends during its prefill either
        sees the target (and closes it) or the opener sees the end (and closes it): never neither.
        """
        with self._lock:
            if self.closed:
                return False
            self.target = target
            self.stage = Stage.OPEN
            return True


class SessionStore:
    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self._sessions: dict[str, ServerSession] = {}
        self._lock = threading.Lock()

    def add(self, session: ServerSession) -> None:
        with self._lock:
            self._sessions[session.id] = session

    def admit(self, session: ServerSession, max_total: int, max_per_client: int) -> None:
        """Add a new stream unless the server or its client already holds its limit; raises LimitExceeded."""
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

    def remove(self, session: ServerSession) -> bool:
        with self._lock:
            return self._sessions.pop(session.id, None) is not None

    def get(self, session_id: str) -> ServerSession | None:
        with self._lock:
            return self._sessions.get(session_id)

    def count_for(self, client: str) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.client == client)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def all(self) -> list[ServerSession]:
        with self._lock:
            return list(self._sessions.values())

    def idle(self, now: float | None = None) -> list[ServerSession]:
        """Open sessions idle for longer than ``idle_s``; they have nothing pending."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [s for s in self._sessions.values()
                    if s.stage is Stage.OPEN and now - s.last_active > self.idle_s and not s.pending]

    def count(self, stage: Stage) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.stage is stage)
