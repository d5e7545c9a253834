"""The observable state of the robot's link to the cloud verifier.

CONNECTED: the channel is up and verdicts come back within ``degraded_after_s``.
DEGRADED: the channel is reconnecting, or verdicts are late: still usable, but the robot
should expect a stall (the bridge may slow down or fall back).
LOST: the channel failed or a session's stream broke: sessions are gone; the robot must
stop acting on cloud output until a new session opens.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("speculative_vlm.protocol.link")


class LinkState(enum.Enum):
    CONNECTED = "connected"
    DEGRADED = "degraded"
    LOST = "lost"


LinkListener = Callable[[LinkState, str], None]


class LinkMonitor:
    """Holds the current state and tells listeners about every change (with the reason)."""

    def __init__(self, initial: LinkState = LinkState.DEGRADED):
        self._state = initial
        self._listeners: list[LinkListener] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    @property
    def state(self) -> LinkState:
        return self._state

    def add_listener(self, listener: LinkListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: LinkListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def set(self, state: LinkState, reason: str) -> None:
        with self._lock:
            if state is self._state:
                return
            self._state = state
            listeners = list(self._listeners)
            self._changed.notify_all()
        log.info("link %s: %s", state.value, reason)
        for listener in listeners:
            try:
                listener(state, reason)
            except Exception:  # a faulty listener must not break the link
                log.exception("link listener failed")

    def wait_for(self, state: LinkState, timeout: float) -> bool:
        with self._lock:
            return self._changed.wait_for(lambda: self._state is state, timeout)
