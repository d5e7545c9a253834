"""Draft-length policies, and the per-session choice between speculation and cloud AR streaming.

With per-token acceptance ``a``, a block of ``k`` drafted tokens yields on average
``(1 - a^(k+1)) / (1 - a)`` tokens (accepted ones plus the correction or bonus). A round
costs ``k * d`` of drafting, a round trip ``R`` and a verification ``V(k)``.
:class:`AdaptiveLength` measures ``a``, ``d``, ``R`` and ``V(k) = v0 + v1 * k`` as it
goes (exponential moving averages) and picks the ``k`` with the most tokens per second.

:class:`MethodChooser` decides once per session, before it opens, from the previous sessions'
measurements: speculative decoding with the draft length the round trip calls for, or the
verifier streaming the target's own tokens (cloud autoregressive), whichever its cost model
predicts faster; see the model's comment below.
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

    def for_session(self, length: int) -> FixedLength:
        """This policy for one session whose draft length was chosen for it."""
        return FixedLength(length)


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

    def for_session(self, length: int) -> AdaptiveLength:
        """Start the next session at ``length`` (allowed even above ``max_length``) and adapt from there;
        what it measured so far is kept."""
        self.max_length = max(self.max_length, length)
        self.length = length
        return self


# ---- which method a session uses -------------------------------------------------------------------
#
# Both methods are lossless: speculative decoding outputs what the target would, and in cloud
# autoregressive mode the verifier streams the target's own greedy tokens. What differs is the time.
# Per command, after the session is open (the prompt prefill and one round trip, the same for both):
#
#   speculative, gamma per block:  rounds(gamma) * (gamma * d + R + V(gamma))
#       rounds(gamma) = N / (E(a, gamma) + phi) + 1/2   (phi: tokens the grammar forces after a verdict;
#                                                       the last round is half used on average)
#   cloud AR:                      P * V_ar             (one target pass per token the grammar does not
#                                                       force; the tokens stream, so R is paid only once)
#
# with N output tokens per command, P of them decided by the target, per-token acceptance a, drafting d
# per token, round trip R, a verification pass V(k) = v0 + v1 * k for k drafted tokens and an
# autoregressive step V_ar. The best gamma grows with R (a round trip is amortised over more tokens) as
# the delay-adaptive control of ANCHORS says; past some R no gamma beats streaming.

SPECULATIVE = "speculative"
CLOUD_AR = "cloud_ar"
AUTO = "auto"
METHODS = (AUTO, SPECULATIVE, CLOUD_AR)


@dataclass(frozen=True)
class SessionObservation:
    """What one finished session measured, as :class:`MethodChooser` learns from it."""

    method: str  # SPECULATIVE or CLOUD_AR
    tokens: int  # output tokens decoded by rounds or streamed (the grammar's tokens at the open excluded)
    decided: int  # output tokens the grammar did not force: the target passes cloud AR needs for them
    # The round trip as rounds saw it: a block's wait for its verdict less the pass (speculative only).
    rtt_s: float | None = None
    # The open's round trip: opening less the verifier's prefill (both methods, where the verifier says).
    open_rtt_s: float | None = None
    rounds: tuple[RoundObservation, ...] = ()  # speculative: one per round
    forced_after_verdicts: int = 0  # speculative: tokens the grammar forced right after a verdict
    stream_pass_s: float | None = None  # cloud AR: seconds per target pass while streaming


@dataclass(frozen=True)
class Choice:
    """A session's method and draft length, with the predictions (decoding seconds after the open) behind it."""

    method: str
    gamma: int = 0  # draft tokens per block (speculative only)
    speculative_s: float | None = None  # predicted for the best gamma
    cloud_ar_s: float | None = None
    reason: str = ""

    def __str__(self) -> str:
        what = f"speculative, {self.gamma} per block" if self.method == SPECULATIVE else "cloud autoregressive"
        return f"{what}: {self.reason}" if self.reason else what


class MethodChooser:
    """Chooses per session between speculative decoding (and its draft length) and cloud AR streaming.

    Fed by :meth:`observe` after every session (whichever method it used) and :meth:`observe_rtt`
    with any other round-trip measurement. Measurements are kept as sums that decay by ``memory`` per
    session, so a change (acceptance collapsing on new prompts, a slower verifier) shows within a few
    sessions; the round trip is the latest measured. A streamed session sees only its open's round trip,
    which also holds the open's set-up (the stream, authentication, a busy thread): speculative sessions,
    which see both, measure that extra to take it off, as the least any of them saw (a disturbance only
    ever lengthens an open), and not from the first session: its open may have waited for the connection
    to come up (gRPC waits for the server's HTTP/2 settings, one one-way delay away; TCP and TLS
    handshakes add round trips on a real link), a cost paid once per connection, not per open; taken
    off every later streamed open it made their round trip read one one-way delay short (62-68 ms for a
    120 ms link). An extra not known yet counts as none: the round trip reads a little long, which
    leans towards streaming, the safe side. Speculation is chosen only when it is predicted to
    be at least ``margin`` faster than streaming, because the target is to be never slower than cloud AR.
    While cloud AR is chosen nothing new is learnt about the draft, so every ``explore_every``-th such
    session speculates once to re-measure it (0: never).
    """

    def __init__(self, initial_gamma: int = 4, min_gamma: int = 1, max_gamma: int = 16, margin: float = 0.1,
                 memory: float = 0.7, explore_every: int = 20):
        if not 1 <= min_gamma <= initial_gamma <= max_gamma:
            raise ValueError(f"need 1 <= min_gamma <= initial_gamma <= max_gamma, got {min_gamma}, "
                             f"{initial_gamma}, {max_gamma}")
        if not 0.0 <= margin < 1.0 or not 0.0 <= memory < 1.0:
            raise ValueError("margin and memory must be in [0, 1)")
        self.initial_gamma, self.min_gamma, self.max_gamma = initial_gamma, min_gamma, max_gamma
        self.margin, self.memory, self.explore_every = margin, memory, explore_every
        self.rtt_s: float | None = None
        # The least an open's round trip exceeded its session's rounds' (the open's set-up); None: not seen.
        self._open_extra_s: float | None = None
        self._opens_seen = 0  # sessions whose open's round trip was measured
        self._since_speculative = 0  # sessions streamed since the last speculative one
        # Decayed sums.
        self._accepted = self._trials = 0.0  # per-token acceptance: a truncated geometric
        self._draft_s = self._drafted = 0.0
        self._rounds = self._forced_after = 0.0
        self._tokens = self._decided = self._sessions = 0.0
        self._fit = [0.0] * 5  # weighted sums for V(k) = v0 + v1 k: w, k, k^2, V, kV
        self._ar_s = self._ar_w = 0.0

    # -- measurements ----------------------------------------------------------------------------
    def observe_rtt(self, rtt_s: float) -> None:
        """A round trip measured outside a session (a probe)."""
        self.rtt_s = max(0.0, rtt_s)

    def observe(self, obs: SessionObservation) -> None:
        keep = self.memory
        self._accepted *= keep
        self._trials *= keep
        self._draft_s *= keep
        self._drafted *= keep
        self._rounds *= keep
        self._forced_after *= keep
        self._tokens *= keep
        self._decided *= keep
        self._sessions *= keep
        self._fit = [s * keep for s in self._fit]
        self._ar_s *= keep
        self._ar_w *= keep
        if obs.rtt_s is not None:
            self.rtt_s = max(0.0, obs.rtt_s)
            if obs.open_rtt_s is not None and self._opens_seen:  # not the first: it may have connected
                extra = max(0.0, obs.open_rtt_s - obs.rtt_s)
                self._open_extra_s = extra if self._open_extra_s is None else min(self._open_extra_s, extra)
        elif obs.open_rtt_s is not None:
            self.rtt_s = max(0.0, obs.open_rtt_s - (self._open_extra_s or 0.0))
        if obs.open_rtt_s is not None:
            self._opens_seen += 1
        self._tokens += obs.tokens
        self._decided += obs.decided
        self._sessions += 1
        if obs.method == CLOUD_AR:
            self._since_speculative += 1
            if obs.stream_pass_s is not None and obs.decided:
                self._ar_s += obs.stream_pass_s * obs.decided
                self._ar_w += obs.decided
            return
        self._since_speculative = 0
        for r in obs.rounds:
            # Accepted successes out of accepted + (1 if a rejection ended the block) trials.
            self._accepted += r.accepted
            self._trials += r.accepted + (1 if r.accepted < r.drafted else 0)
            self._draft_s += r.draft_s
            self._drafted += r.drafted
            w = self._fit
            w[0] += 1
            w[1] += r.drafted
            w[2] += r.drafted * r.drafted
            w[3] += r.verify_s
            w[4] += r.drafted * r.verify_s
        self._rounds += len(obs.rounds)
        self._forced_after += obs.forced_after_verdicts

    # -- the model -------------------------------------------------------------------------------
    @property
    def measured(self) -> bool:
        """Whether a speculative session has been seen (acceptance, drafting and verification known)."""
        return self._fit[0] > 0

    @property
    def acceptance(self) -> float:
        return self._accepted / self._trials if self._trials else 0.0

    @property
    def draft_per_token_s(self) -> float:
        return self._draft_s / self._drafted if self._drafted else 0.0

    def verify_s(self, k: int) -> float:
        """V(k): a least-squares line through the measured passes (and the autoregressive step at k = 0)."""
        w, sk, skk, sv, skv = self._fit
        if self._ar_w:  # an autoregressive step is a pass with nothing drafted: anchors v0
            anchor = min(self._ar_w, 3.0)
            w, sv = w + anchor, sv + anchor * self._ar_s / self._ar_w
        if not w:
            return 0.0
        spread = w * skk - sk * sk
        if spread <= 1e-9 * max(1.0, w * skk):  # one block length only: no slope to fit
            return sv / w
        v1 = max(0.0, (w * skv - sk * sv) / spread)
        v0 = max(0.0, (sv - v1 * sk) / w)
        return v0 + v1 * k

    @property
    def autoregressive_step_s(self) -> float:
        """V_ar: measured while streaming, else the fitted pass with nothing drafted."""
        return self._ar_s / self._ar_w if self._ar_w else self.verify_s(0)

    def _tokens_per_session(self, budget: int | None = None) -> tuple[float, float]:
        """(output tokens, decided tokens) of a session as the previous ones went, within ``budget``."""
        if not self._sessions:
            return 0.0, 0.0
        tokens, decided = self._tokens / self._sessions, self._decided / self._sessions
        if budget is not None and tokens > budget:
            tokens, decided = budget, decided * budget / tokens
        return tokens, decided

    def speculative_s(self, gamma: int, max_new_tokens: int | None = None) -> float:
        """Predicted decoding seconds of a command after the open, speculating ``gamma`` per block."""
        n, _ = self._tokens_per_session(max_new_tokens)
        phi = self._forced_after / self._rounds if self._rounds else 0.0
        rounds = max(1.0, n / (expected_tokens(self.acceptance, gamma) + phi) + 0.5)
        return rounds * (gamma * self.draft_per_token_s + (self.rtt_s or 0.0) + self.verify_s(gamma))

    def cloud_ar_s(self, max_new_tokens: int | None = None) -> float:
        """Predicted decoding seconds of a command after the open, streamed by the target alone."""
        _, decided = self._tokens_per_session(max_new_tokens)
        return decided * self.autoregressive_step_s

    def choose(self, can_stream: bool = True, max_new_tokens: int | None = None) -> Choice:
        """The method (and draft length) for the next session."""
        if not self.measured:
            return Choice(SPECULATIVE, self.initial_gamma,
                          reason="no speculative session measured yet: speculating measures acceptance and timings")
        top = self.max_gamma if max_new_tokens is None else max(self.min_gamma, min(self.max_gamma, max_new_tokens - 1))
        costs = {g: self.speculative_s(g, max_new_tokens) for g in range(self.min_gamma, top + 1)}
        gamma = min(costs, key=costs.get)
        spec, ar = costs[gamma], self.cloud_ar_s(max_new_tokens)
        rtt = f"RTT {(self.rtt_s or 0.0) * 1e3:.0f} ms, acceptance {self.acceptance:.2f}"
        predicted = f"predicted {spec:.2f} s against cloud AR {ar:.2f} s after the open; {rtt}"
        if spec <= (1.0 - self.margin) * ar:
            return Choice(SPECULATIVE, gamma, spec, ar, predicted)
        if not can_stream:
            return Choice(SPECULATIVE, gamma, spec, ar,
                          f"{predicted}; cloud AR would not be slower but this verifier cannot stream")
        if self.explore_every and self._since_speculative >= self.explore_every:
            return Choice(SPECULATIVE, gamma, spec, ar, f"{predicted}; speculating once to re-measure the draft "
                                                        f"after {self._since_speculative} streamed sessions")
        return Choice(CLOUD_AR, 0, spec, ar, predicted)
