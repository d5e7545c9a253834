"""The server's sessions: one per open stream, with its engine state and its outbox.

A session is touched whenever its client sends something; one idle longer than the
configured time is expired (its KV cache freed, its stream ended with an Error), so a
robot that vanished without closing does not hold target memory forever.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from speculative_vlm.decoding.verifier import DraftBlock
from speculative_vlm.protocol import verifier_pb2 as pb

_ids = itertools.count(1)


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
    last_active: float = field(default_factory=time.monotonic)
    closed: bool = False

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def send(self, message: pb.ServerMessage) -> None:
        if not self.closed:
            self.outbox.put(message)

    def end(self, message: pb.ServerMessage | None = None) -> None:
        """Send a last message (if any) and end the stream; idempotent."""
        if self.closed:
            return
        if message is not None:
            self.outbox.put(message)
        self.closed = True
        self.outbox.put(None)


class SessionStore:
    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self._sessions: dict[str, ServerSession] = {}
        self._lock = threading.Lock()

    def add(self, session: ServerSession) -> None:
        with self._lock:
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
        """Sessions idle for longer than ``idle_s``; they have nothing pending."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [s for s in self._sessions.values()
                    if now - s.last_active > self.idle_s and not s.pending]
