"""Draft-length policies: a fixed length, or the length that maximises tokens per second.

With per-token acceptance ``a``, a block of ``k`` drafted tokens yields on average
``(1 - a^(k+1)) / (1 - a)`` tokens (accepted ones plus the correction or bonus). A round
costs ``k * d`` of drafting, a round trip ``R`` and a verification ``V(k)``.
:class:`AdaptiveLength` measures ``a``, ``d``, ``R`` and ``V(k) = v0 + v1 * k`` as it
goes (exponential moving averages) and picks the ``k`` with the most tokens per second.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundObservation:
    drafted: int
    accepted: int
    draft_s: float  # time spent drafting this block
    verify_s: float  # verifier-side time of the pass
    wait_s: float  # from submit to final verdict, seen by the drafter


class FixedLength:
    def __init__(self, length: int = 4):
        if length < 0:
            raise ValueError("draft length must be >= 0")
        self.length = length

    def next_length(self) -> int:
        return self.length

    def observe(self, obs: RoundObservation) -> None:
        pass


def expected_tokens(acceptance: float, k: int) -> float:
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


class AdaptiveLength:
    def __init__(self, initial: int = 4, min_length: int = 1, max_length: int = 8, smoothing: float = 0.3):
        self.min_length, self.max_length = min_length, max_length
        self.length = initial
        self.alpha = smoothing
        self.acceptance = 0.7  # prior until measured
        self.draft_per_token_s: float | None = None
        self.rtt_s = 0.0
        self.verify_base_s: float | None = None
        self.verify_per_token_s = 0.0

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe(self, obs: RoundObservation) -> None:
        if obs.drafted > 0:
            # Per-token acceptance from a truncated geometric: accepted successes out of
            # accepted + (1 if a rejection ended the block) trials.
            trials = obs.accepted + (1 if obs.accepted < obs.drafted else 0)
            if trials:
                self.acceptance = self._ema(self.acceptance, obs.accepted / trials)
            self.draft_per_token_s = self._ema(self.draft_per_token_s, obs.draft_s / obs.drafted)
        self.rtt_s = self._ema(self.rtt_s, max(0.0, obs.wait_s - obs.verify_s))
        # V(k): the base from the first observation, the slope from later ones.
        if self.verify_base_s is None:
            self.verify_base_s = obs.verify_s
        else:
            predicted = self.verify_base_s + self.verify_per_token_s * obs.drafted
            error = obs.verify_s - predicted
            self.verify_base_s = max(0.0, self.verify_base_s + self.alpha * error * 0.5)
            if obs.drafted:
                self.verify_per_token_s = max(0.0, self.verify_per_token_s + self.alpha * error * 0.5 / obs.drafted)
        self.length = self.best_length()

    def rate(self, k: int) -> float:
        d = self.draft_per_token_s or 0.0
        v = (self.verify_base_s or 0.0) + self.verify_per_token_s * k
        cost = k * d + self.rtt_s + v
        return expected_tokens(self.acceptance, k) / max(cost, 1e-9)

    def best_length(self) -> int:
        return max(range(self.min_length, self.max_length + 1), key=self.rate)

    def next_length(self) -> int:
        return self.length
