"""When the robot decodes a step again, and how long it waits first.

A step's command is executed only once the whole step has been decoded and verified, so a
verifier that goes away while the step decodes (a restart that drains, a replica that dies, a
link that drops) has cost the robot nothing but time: the step is decoded again from its
start in a new session, on the same address or another, with the same prompt. Under greedy
decoding the new session verifies exactly the same tokens (the output is the target's own),
so the command is the one the undisturbed step would have produced.

:func:`retryable` says which errors allow that (the server or the link failed, not the
request); :class:`Backoff` spaces the attempts: exponential with jitter, so a fleet of robots
whose server restarted does not come back in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from speculative_vlm.decoding.verifier import LinkLost, Refused, SessionNotFound, VerifierTimeout


def retryable(error: BaseException) -> bool:
    """Whether a step that failed with ``error`` may be decoded again in a new session.

    Retryable: the link was lost or the server drained (:class:`LinkLost` and its
    :class:`~speculative_vlm.decoding.verifier.Draining`), the session vanished with its server
    (:class:`SessionNotFound`), or no verdict came in time (:class:`VerifierTimeout`). A
    :class:`Refused` request is refused again however often it is sent.
    """
    if isinstance(error, Refused):
        return False
    return isinstance(error, (LinkLost, SessionNotFound, VerifierTimeout))


@dataclass
class Backoff:
    """Delays before retry 1, 2, ...: ``initial_s * 2**(n-1)`` capped at ``max_s``, then jittered.

    "Equal jitter": the delay is drawn uniformly from [d * (1 - jitter), d], so it never drops
    below half of the schedule at ``jitter`` 0.5 and robots that failed together spread out.
    """

    initial_s: float = 0.2
    max_s: float = 5.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < self.initial_s:
            raise ValueError(f"back-off needs 0 <= initial_s <= max_s, got {self.initial_s} and {self.max_s}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter is a fraction in [0, 1], got {self.jitter}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        if retry < 1:
            raise ValueError(f"retries are numbered from 1, got {retry}")
        scheduled = min(self.max_s, self.initial_s * 2.0 ** min(retry - 1, 62))
        return scheduled * (1.0 - self.jitter * self.rng.random())
