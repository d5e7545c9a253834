"""The speculative loop: draft, submit, follow early and final verdicts, draft preemptively.

:class:`SpeculativeDecoder` runs one request against any :class:`Verifier`. Each round it
drafts a block (length from the policy) and submits it. When an EARLY verdict arrives
with enough confidence, it drafts the next block right away on the output that verdict
implies (a *preemptive* block) and, with pipelining, submits it at once, tagged with the
prefix it assumes. When the FINAL verdict agrees with that assumption the preemptive
block is already drafted (and already on its way): an early *hit*. When it does not, the
block is discarded (a *miss*) and the verifier drops it unverified. Only FINAL verdicts
change the output, so the output is the target's whatever the exits say.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from speculative_vlm.decoding.drafter import Draft, Drafter
from speculative_vlm.decoding.models import ModelAdapter
from speculative_vlm.decoding.policy import FixedLength, RoundObservation
from speculative_vlm.decoding.verifier import (
    EARLY_THRESHOLD,
    DraftBlock,
    SessionRequest,
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
        return len(self.rounds) if self.verified else 0

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
    def __init__(
        self,
        draft: ModelAdapter,
        verifier: Verifier,
        policy=None,
        preempt: bool = True,
        pipeline: bool = True,
        early_threshold: float = EARLY_THRESHOLD,
        verdict_timeout_s: float = 120.0,
    ):
        self.draft = draft
        self.verifier = verifier
        self.policy = policy or FixedLength(4)
        self.preempt = preempt
        self.pipeline = pipeline and preempt
        self.early_threshold = early_threshold
        self.verdict_timeout_s = verdict_timeout_s
        engine = getattr(verifier, "engine", None)
        if engine is not None:  # in-process: the target is at hand, check the pairing now
            draft.check_pairs_with(engine.model)

    def generate(
        self, request: SessionRequest, on_text: TextCallback | None = None, should_stop: StopCheck | None = None
    ) -> GenerationResult:
        """Decode ``request`` speculatively; ``on_text`` gets the verified text after each verdict.

        ``should_stop`` is asked before each round and on every verdict (early ones included), so
        a caller that wants out (a cancelled goal) waits at most for the verdict in flight: when it
        returns True the session is closed and :class:`Cancelled` raised with the partial result.
        """
        start = time.perf_counter()
        drafter = Drafter(self.draft, request)  # bad input fails here, before the verifier is asked
        session = self.verifier.open(request)
        committed: list[int] = []
        result = GenerationResult(text="", token_ids=[])

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
                    current = self._draft_block(drafter, committed, committed, next_round, None)
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
                            preempted = self._preempt(drafter, committed, current, verdict, next_round)
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
                self.policy.observe(
                    RoundObservation(stats.drafted, stats.accepted, stats.draft_s, stats.verify_s, stats.wait_s)
                )
                done = final.eos  # the target decides; the drafter follows the same rules
                if on_text is not None:
                    on_text(self.draft.decode(committed))
            result.token_ids = committed
            result.text = self.draft.decode(committed)
            result.stop_reason = _stop_reason(committed, self.draft, request)
            result.wall_s = time.perf_counter() - start
            return result
        finally:
            session.close()

    def _draft_block(
        self, drafter: Drafter, assumed: list[int], committed: list[int], round_no: int, early: Verdict | None
    ) -> _InFlight:
        d = drafter.draft(self.policy.next_length())
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
        self, drafter: Drafter, committed: list[int], current: _InFlight, early: Verdict, round_no: int
    ) -> _InFlight | None:
        assumed = committed + list(current.block.tokens[: early.accepted]) + ([early.token] if early.token >= 0 else [])
        drafter.sync(assumed)
        assumed = assumed + drafter.append_forced()
        if drafter.out.done or drafter.out.room <= 1:
            return None  # the assumed output is complete: nothing to draft after it
        return self._draft_block(drafter, assumed, committed, round_no, early)

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
            stop_reason=_stop_reason(committed, self.draft, request),
            wall_s=time.perf_counter() - start,
        )


def _stop_reason(tokens: list[int], model: ModelAdapter, request: SessionRequest) -> str:
    if tokens and tokens[-1] in model.eos_token_ids:
        return "eos"
    return "length" if len(tokens) >= request.settings.max_new_tokens else "eos"


def _same_outcome(early: Verdict, final: Verdict) -> bool:
    return early.accepted == final.accepted and early.token == final.token
