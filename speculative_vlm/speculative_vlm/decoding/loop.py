"""The speculative loop: draft, submit, follow early and final verdicts, draft preemptively.

:class:`SpeculativeDecoder` runs one request against any :class:`Verifier`. Each round it
drafts a block (length from the policy) and submits it. When an EARLY verdict arrives
with enough confidence, it drafts the next block right away on the output that verdict
implies (a *preemptive* block) and, with pipelining, submits it at once, tagged with the
prefix it assumes. When the FINAL verdict agrees with that assumption the preemptive
block is already drafted (and already on its way): an early *hit*. When it does not, the
block is discarded (a *miss*) and the verifier drops it unverified. Only FINAL verdicts
change the output, so the output is the target's whatever the exits say.

Each session first picks its method (``method``: ``speculative``, ``cloud_ar`` or ``auto``). Under
``auto`` the :class:`~speculative_vlm.decoding.policy.MethodChooser` decides from the previous
sessions' measurements (round trip, acceptance, drafting and verification times) whether to speculate,
and with how many tokens per block, or to ask the verifier to stream the target's own tokens (its
``open_autoregressive`` mode, which the gRPC client, the in-process verifier and the ROS bridge's
adapter have). Both are lossless: a streamed token is the target's own choice. Every session,
whatever its method, feeds the chooser.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from speculative_vlm.decoding.drafter import Draft, Drafter
from speculative_vlm.decoding.grammar import GrammarViolation
from speculative_vlm.decoding.models import ModelAdapter
from speculative_vlm.decoding.policy import (
    AUTO,
    CLOUD_AR,
    METHODS,
    SPECULATIVE,
    Choice,
    FixedLength,
    MethodChooser,
    RoundObservation,
    SessionObservation,
)
from speculative_vlm.decoding.target_engine import make_tracker
from speculative_vlm.decoding.verifier import (
    EARLY_THRESHOLD,
    DraftBlock,
    SessionRequest,
    StreamingUnavailable,
    Verdict,
    VerdictKind,
    Verifier,
    VerifierError,
)


class ProtocolViolation(VerifierError):
    """The verifier sent a verdict that does not fit the blocks in flight (a verifier bug)."""


class Cancelled(Exception):
    """The caller's ``should_stop`` asked the loop to stop; the session is already closed.

    Not a :class:`VerifierError`: nothing is wrong with the link, the caller changed its mind (an
    action goal cancelled or preempted). ``partial`` holds the output and rounds verified so far.
    """

    def __init__(self, partial: GenerationResult):
        super().__init__(f"decoding stopped on request after {len(partial.rounds)} rounds "
                         f"({len(partial.token_ids)} tokens verified)")
        self.partial = partial


@dataclass
class RoundStats:
    round: int
    drafted: int
    accepted: int
    committed: int  # tokens this verdict added to the output (accepted + 1 + forced)
    forced: int  # of which forced by the grammar
    preemptive: bool  # this block was drafted preemptively from an early verdict
    # "none" (no exit fired), "seen" (preemption off), "low" (not confident enough), "hit", "miss"
    early: str
    early_layer: int = -1
    early_confidence: float = 0.0
    pipelined: bool = False  # this block was submitted before the previous final verdict
    draft_s: float = 0.0
    wait_s: float = 0.0  # submit -> final verdict, seen by the drafter
    verify_s: float = 0.0  # verifier-side time of the pass


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    rounds: list[RoundStats] = field(default_factory=list)
    verified: bool = True  # False: drafted alone (edge-only / link lost), never checked
    wall_s: float = 0.0
    prompt_forced: int = 0
    # "eos": the model (or the grammar) ended the output; "length": max_new_tokens cut it,
    # so a constrained output may be an unfinished command; "cancelled": should_stop ended it.
    stop_reason: str = "eos"
    method: str = SPECULATIVE  # SPECULATIVE, CLOUD_AR (the verifier streamed the target's tokens) or "draft_only"
    choice: str = ""  # why this method (and draft length) was chosen for the session
    decided: int = 0  # cloud AR: tokens the target decided, one pass each (the grammar forced the rest)
    open_s: float = 0.0  # opening the session on the verifier (prompt prefill + one round trip)
    rtt_s: float | None = None  # the round trip rounds saw (a block's wait less its pass), if measured
    open_rtt_s: float | None = None  # opening less the verifier's prefill, where the verifier reports it
    stream_pass_s: float | None = None  # cloud AR: seconds per target pass, measured from the stream

    @property
    def drafted(self) -> int:
        return sum(r.drafted for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def target_passes(self) -> int:
        if not self.verified:
            return 0
        return self.decided if self.method == CLOUD_AR else len(self.rounds)

    @property
    def tokens_per_pass(self) -> float:
        return len(self.token_ids) / self.target_passes if self.target_passes else 0.0

    @property
    def early_hits(self) -> int:
        return sum(r.early == "hit" for r in self.rounds)

    @property
    def early_misses(self) -> int:
        return sum(r.early == "miss" for r in self.rounds)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "verified": self.verified,
            "method": self.method,
            "choice": self.choice,
            "stop_reason": self.stop_reason,
            "tokens": len(self.token_ids),
            "rounds": len(self.rounds),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": round(self.acceptance, 4),
            "tokens_per_target_pass": round(self.tokens_per_pass, 4),
            "early_hits": self.early_hits,
            "early_misses": self.early_misses,
            "wall_s": round(self.wall_s, 4),
            "open_s": round(self.open_s, 4),
            "rtt_s": None if self.rtt_s is None else round(self.rtt_s, 4),
            "open_rtt_s": None if self.open_rtt_s is None else round(self.open_rtt_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "draft_s": round(sum(r.draft_s for r in self.rounds), 4),
            "wait_s": round(sum(r.wait_s for r in self.rounds), 4),
            "verify_s": round(sum(r.verify_s for r in self.rounds), 4),
            "per_round": [asdict(r) for r in self.rounds],
        }


@dataclass
class _InFlight:
    block: DraftBlock
    draft: Draft
    assumed: list[int]  # the committed output this block extends
    submitted_at: float | None = None
    early: Verdict | None = None  # the early verdict it was drafted from (preemptive only)


TextCallback = Callable[[str], None]
StopCheck = Callable[[], bool]
TAIL = 16  # at most this many assumed tokens travel with a block as base_tail


class SpeculativeDecoder:
    """Decodes a request with a draft model on this side and a target behind any :class:`Verifier`.

    The robot's half of speculative decoding, as transformers' assisted generation pairs a
    candidate generator with the model that checks it: here the draft (``draft``, a
    :class:`~speculative_vlm.decoding.models.ModelAdapter`) proposes each block through a
    :class:`~speculative_vlm.decoding.drafter.Drafter`, and the target checks it wherever it runs
    (``verifier``: :class:`~speculative_vlm.decoding.inprocess.InProcessVerifier` in this process,
    ``protocol.client.GrpcVerifier`` in the cloud, ``nodes.ros_verifier.RosVerifier`` through the
    bridge node). The output is the target's own, token for token (greedy) or in distribution
    (sampling), whatever the draft proposes and whatever the early exits say::

        decoder = SpeculativeDecoder(draft, verifier, policy=AdaptiveLength(), method="auto")
        result = decoder.generate(request, on_text=print, should_stop=goal.cancelled)
        result.text, result.acceptance, result.tokens_per_pass

    ``policy`` gives each block's length (``FixedLength(4)`` by default; ``AdaptiveLength`` learns it
    from acceptance); ``preempt`` drafts the next block from a confident EARLY verdict
    (``early_threshold``) and ``pipeline`` sends it before the FINAL one; ``method`` picks, per
    session, speculation, the target streaming alone (``cloud_ar``) or whichever the ``chooser``
    predicts is faster (``auto``). ``verdict_timeout_s`` bounds each wait for the verifier.

    Public methods: :meth:`generate` decodes one request (verified, lossless);
    :meth:`generate_unverified` runs the draft alone (the edge-only baseline, or the fallback
    when the link is lost and the caller allows it); :meth:`choose` says which method and draft
    length the next session would use. Errors are the verifier's typed ones
    (:class:`~speculative_vlm.decoding.verifier.Refused` and its kinds, ``LinkLost``, ...), raised
    the same over every verifier; :class:`Cancelled` when ``should_stop`` asked out.
    """

    def __init__(
        self,
        draft: ModelAdapter,
        verifier: Verifier,
        policy=None,
        preempt: bool = True,
        pipeline: bool = True,
        early_threshold: float = EARLY_THRESHOLD,
        verdict_timeout_s: float = 120.0,
        method: str = SPECULATIVE,
        chooser: MethodChooser | None = None,
    ):
        self.draft = draft
        self.verifier = verifier
        self.policy = policy or FixedLength(4)
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {METHODS}")
        self.method = method
        self.chooser = chooser or MethodChooser(initial_gamma=max(1, self.policy.next_length()))
        self.last_choice: Choice | None = None
        self.preempt = preempt
        self.pipeline = pipeline and preempt
        self.early_threshold = early_threshold
        self.verdict_timeout_s = verdict_timeout_s
        engine = getattr(verifier, "engine", None)
        if engine is not None:  # in-process: the target is at hand, check the pairing now
            draft.check_pairs_with(engine.model)

    @property
    def can_stream(self) -> bool:
        """Whether the verifier can stream the target's own tokens (cloud autoregressive mode)."""
        return callable(getattr(self.verifier, "open_autoregressive", None))

    def choose(self, request: SessionRequest) -> Choice:
        """The method (and draft length) the next session of ``request`` will use."""
        if self.method == CLOUD_AR:
            if not self.can_stream:
                raise StreamingUnavailable("streaming_unavailable", f"{type(self.verifier).__name__} cannot stream "
                                           "the target's tokens; use method speculative or auto")
            return Choice(CLOUD_AR, reason="method cloud_ar")
        if self.method == SPECULATIVE:
            return Choice(SPECULATIVE, self.policy.next_length(), reason="method speculative")
        return self.chooser.choose(can_stream=self.can_stream, max_new_tokens=request.settings.max_new_tokens)

    def generate(
        self, request: SessionRequest, on_text: TextCallback | None = None, should_stop: StopCheck | None = None
    ) -> GenerationResult:
        """Decode ``request`` with the session's method; ``on_text`` gets the verified text as it grows.

        ``should_stop`` is asked before each round and on every verdict (early ones included), or on
        every streamed token, so a caller that wants out (a cancelled goal) waits at most for the
        verdict in flight: when it returns True the session is closed and :class:`Cancelled` raised
        with the partial result.
        """
        choice = self.choose(request)
        self.last_choice = choice
        if choice.method == CLOUD_AR:
            result = self._stream(request, on_text, should_stop)
        else:
            policy = self.policy.for_session(choice.gamma) if self.method == AUTO else self.policy
            result = self._speculate(request, on_text, should_stop, policy)
        result.method, result.choice = choice.method, str(choice)
        self.chooser.observe(self._observation(request, result))
        return result

    def _speculate(
        self, request: SessionRequest, on_text: TextCallback | None, should_stop: StopCheck | None, policy
    ) -> GenerationResult:
        start = time.perf_counter()
        drafter = Drafter(self.draft, request)  # bad input fails here, before the verifier is asked
        opening = time.perf_counter()
        session = self.verifier.open(request)
        open_s = time.perf_counter() - opening
        committed: list[int] = []
        result = GenerationResult(text="", token_ids=[], open_s=open_s)

        def check_stop() -> None:
            if should_stop is not None and should_stop():
                result.token_ids, result.text = list(committed), self.draft.decode(committed)
                result.stop_reason, result.wall_s = "cancelled", time.perf_counter() - start
                raise Cancelled(result)

        try:
            committed = drafter.append_forced()
            result.prompt_forced = len(committed)
            abandoned: set[int] = set()
            next_round = 0
            queued: _InFlight | None = None
            done = drafter.out.done
            while not done:
                check_stop()
                if queued is not None:
                    current, queued = queued, None
                else:
                    current = self._draft_block(drafter, committed, committed, next_round, None, policy)
                    next_round += 1
                if current.submitted_at is None:
                    session.submit(current.block)
                    current.submitted_at = time.perf_counter()
                pipelined_current = current.block.preemptive and self.pipeline
                stats = RoundStats(
                    round=current.block.round,
                    drafted=len(current.block.tokens),
                    accepted=0,
                    committed=0,
                    forced=0,
                    preemptive=current.block.preemptive,
                    early="none",
                    pipelined=pipelined_current,
                    draft_s=current.draft.seconds,
                )
                preempted: _InFlight | None = None
                while True:
                    verdict = session.next_verdict(timeout=self.verdict_timeout_s)
                    check_stop()
                    if verdict.round in abandoned:
                        continue
                    if verdict.round != current.block.round:
                        raise ProtocolViolation(
                            f"verdict for round {verdict.round} while round {current.block.round} is in flight"
                        )
                    if verdict.kind is VerdictKind.EARLY:
                        if stats.early_layer < 0:
                            stats.early_layer, stats.early_confidence = verdict.exit_layer, verdict.confidence
                            stats.early = "low" if self.preempt else "seen"
                        if (
                            self.preempt
                            and preempted is None
                            and verdict.confidence >= self.early_threshold
                        ):
                            stats.early_layer, stats.early_confidence = verdict.exit_layer, verdict.confidence
                            preempted = self._preempt(drafter, committed, current, verdict, next_round, policy)
                            if preempted is not None:
                                next_round += 1
                                if self.pipeline:
                                    session.submit(preempted.block)
                                    preempted.submitted_at = time.perf_counter()
                        continue
                    if verdict.kind is VerdictKind.DROPPED:
                        raise ProtocolViolation(f"round {verdict.round} was dropped though its prefix holds")
                    break
                final = verdict
                stats.wait_s = time.perf_counter() - (current.submitted_at or start)
                stats.verify_s = final.verify_time_s
                stats.accepted = final.accepted
                new = list(current.block.tokens[: final.accepted]) + ([final.token] if final.token >= 0 else [])
                if preempted is not None and preempted.early is not None and _same_outcome(preempted.early, final):
                    stats.early = "hit"
                    committed = list(preempted.assumed)
                    stats.forced = len(committed) - len(current.assumed) - len(new)
                    queued = preempted
                else:
                    if preempted is not None:
                        stats.early = "miss"
                        abandoned.add(preempted.block.round)
                    committed = committed + new
                    drafter.sync(committed)
                    forced = drafter.append_forced()
                    committed = committed + forced
                    stats.forced = len(forced)
                stats.committed = len(new) + stats.forced
                result.rounds.append(stats)
                policy.observe(
                    RoundObservation(stats.drafted, stats.accepted, stats.draft_s, stats.verify_s, stats.wait_s)
                )
                done = final.eos  # the target decides; the drafter follows the same rules
                if on_text is not None:
                    on_text(self.draft.decode(committed))
            result.token_ids = committed
            result.text = self.draft.decode(committed)
            result.stop_reason = _stop_reason(committed, self.draft, request)
            result.wall_s = time.perf_counter() - start
            result.rtt_s = _round_rtt(result.rounds)
            result.open_rtt_s = _open_rtt(session, open_s)
            return result
        finally:
            session.close()

    def _stream(
        self, request: SessionRequest, on_text: TextCallback | None, should_stop: StopCheck | None
    ) -> GenerationResult:
        """Cloud autoregressive: the verifier streams the target's own tokens; nothing is drafted.

        The draft's copy of the output rules tells which tokens the grammar forced, so the tokens the
        target decided (one pass each) are counted, and the time per pass measured.
        """
        start = time.perf_counter()
        tracker = make_tracker(self.draft, request)  # an unknown grammar fails here, before the verifier is asked
        opening = time.perf_counter()  # the open alone, as a speculative session times it (not the tracker)
        session = self.verifier.open_autoregressive(request)
        opened = time.perf_counter()
        result = GenerationResult(text="", token_ids=[], method=CLOUD_AR, open_s=opened - opening,
                                  open_rtt_s=_open_rtt(session, opened - opening))
        tokens: list[int] = []
        forced: list[bool] = []
        last = opened
        try:
            while True:
                if should_stop is not None and should_stop():
                    result.token_ids, result.text = list(tokens), self.draft.decode(tokens)
                    result.stop_reason, result.wall_s = "cancelled", time.perf_counter() - start
                    result.decided = forced.count(False)
                    raise Cancelled(result)
                item = session.next_token(timeout=self.verdict_timeout_s)
                if item.token >= 0:
                    last = time.perf_counter()
                    forced.append(_next_is_forced(tracker))
                    try:
                        tracker.extend([item.token])
                    except GrammarViolation:  # the two sides' rules disagree: count the rest as decided
                        tracker.grammar = None
                    tokens.append(item.token)
                    if on_text is not None:
                        on_text(self.draft.decode(tokens))
                if item.eos:
                    break
        finally:
            session.close()
        result.token_ids, result.text = tokens, self.draft.decode(tokens)
        result.decided = forced.count(False)
        result.prompt_forced = next((i for i, f in enumerate(forced) if not f), len(forced))  # forced at the open
        result.stop_reason = _stop_reason(tokens, self.draft, request)
        result.wall_s = time.perf_counter() - start
        # Tokens arrive as the target decides them: from the open to the last token is one pass each.
        result.stream_pass_s = (last - opened) / result.decided if result.decided else None
        return result

    def _observation(self, request: SessionRequest, result: GenerationResult) -> SessionObservation:
        tokens = len(result.token_ids) - result.prompt_forced
        if result.method == CLOUD_AR:
            return SessionObservation(CLOUD_AR, tokens, result.decided, open_rtt_s=result.open_rtt_s,
                                      stream_pass_s=result.stream_pass_s)
        rounds = tuple(RoundObservation(r.drafted, r.accepted, r.draft_s, r.verify_s, r.wait_s) for r in result.rounds)
        return SessionObservation(SPECULATIVE, tokens, _decided(self.draft, request, result.token_ids), result.rtt_s,
                                  result.open_rtt_s, rounds, sum(r.forced for r in result.rounds))

    def _draft_block(
        self, drafter: Drafter, assumed: list[int], committed: list[int], round_no: int, early: Verdict | None,
        policy,
    ) -> _InFlight:
        d = drafter.draft(policy.next_length())
        # The tail covers every assumed token not yet confirmed (and a few before them),
        # so the verifier can tell exactly whether the assumption held.
        unconfirmed = len(assumed) - len(committed)
        tail = tuple(assumed[-max(unconfirmed + 1, min(TAIL, len(assumed))) :]) if assumed else ()
        block = DraftBlock(
            round=round_no,
            base_length=len(assumed),
            base_tail=tail,
            tokens=d.tokens,
            preemptive=early is not None,
            q=d.q,
        )
        return _InFlight(block, d, list(assumed), early=early)

    def _preempt(
        self, drafter: Drafter, committed: list[int], current: _InFlight, early: Verdict, round_no: int, policy
    ) -> _InFlight | None:
        assumed = committed + list(current.block.tokens[: early.accepted]) + ([early.token] if early.token >= 0 else [])
        drafter.sync(assumed)
        assumed = assumed + drafter.append_forced()
        if drafter.out.done or drafter.out.room <= 1:
            return None  # the assumed output is complete: nothing to draft after it
        return self._draft_block(drafter, assumed, committed, round_no, early, policy)

    def generate_unverified(
        self, request: SessionRequest, on_text: TextCallback | None = None, should_stop: StopCheck | None = None
    ) -> GenerationResult:
        """The draft alone (edge-only baseline, or the fallback when the link is lost).

        ``should_stop`` is asked before each chunk of 8 drafted tokens, as :meth:`generate` does.
        """
        start = time.perf_counter()
        drafter = Drafter(self.draft, request)
        committed = drafter.append_forced()
        while not drafter.out.done:
            if should_stop is not None and should_stop():
                raise Cancelled(GenerationResult(
                    text=self.draft.decode(committed), token_ids=list(committed), verified=False,
                    stop_reason="cancelled", wall_s=time.perf_counter() - start))
            drafter.draft(8, reserve=0)
            committed = list(drafter.tokens) + drafter.append_forced()
            if on_text is not None:
                on_text(self.draft.decode(committed))
        committed = list(drafter.tokens)
        return GenerationResult(
            text=self.draft.decode(committed),
            token_ids=committed,
            verified=False,
            method="draft_only",
            stop_reason=_stop_reason(committed, self.draft, request),
            wall_s=time.perf_counter() - start,
        )


def _stop_reason(tokens: list[int], model: ModelAdapter, request: SessionRequest) -> str:
    if tokens and tokens[-1] in model.eos_token_ids:
        return "eos"
    return "length" if len(tokens) >= request.settings.max_new_tokens else "eos"


def _next_is_forced(tracker) -> bool:
    """Whether the grammar allows only one token next (then no model pass decides it)."""
    return tracker.grammar is not None and not tracker.done and tracker.grammar.forced_token() is not None


def _decided(model: ModelAdapter, request: SessionRequest, tokens: list[int]) -> int:
    """Tokens of an output the target had to decide: what cloud AR would spend one pass on each."""
    if not request.settings.grammar:
        return len(tokens)
    tracker = make_tracker(model, request)
    decided = 0
    for n, token in enumerate(tokens):
        decided += not _next_is_forced(tracker)
        try:
            tracker.extend([token])
        except GrammarViolation:  # the rules disagree: count the rest as decided
            return decided + len(tokens) - n - 1
    return decided


def _round_rtt(rounds: list[RoundStats]) -> float | None:
    """The round trip rounds saw: the median wait less the pass of the rounds whose wait nothing else shared
    (not pipelined, nothing drafted meanwhile), else the least of those not pipelined (drafting a
    preemptive block may have delayed reading their verdict, never hastened it)."""
    alone = [r for r in rounds if not r.pipelined]
    clean = [r.wait_s - r.verify_s for r in alone if r.early not in ("hit", "miss")]
    if clean:
        return max(0.0, statistics.median(clean))
    return max(0.0, min(r.wait_s - r.verify_s for r in alone)) if alone else None


def _open_rtt(session, open_s: float) -> float | None:
    """Opening less the verifier's prefill, when the verifier reports its prefill (the gRPC Opened does)."""
    prefill = getattr(getattr(session, "opened", None), "prefill_time_s", None)
    return None if prefill is None else max(0.0, open_s - prefill)


def _same_outcome(early: Verdict, final: Verdict) -> bool:
    return early.accepted == final.accepted and early.token == final.token
