"""The methods the benchmark compares, and how each one decodes a request.

The ladder adds one mechanism per rung; every speculative rung decodes under the command
grammar (masks on both sides, tokens the grammar forces appended without drafting or a
target pass), because that is how the robot runs. The grammar's own contribution is shown
by the top rung with the grammar switched off (free text: it is checked against the
target's own unconstrained output, and is usually not a command at all).

    cloud_ar          the server generates alone and streams the answer (baseline)
    edge_only         the draft alone on the robot, never verified (baseline; not lossless)
    spec_vanilla      draft 4, send, wait for the final verdict (no exits on the server)
    spec_preempt      + early-exit preemption: draft the next block on a confident early verdict
    spec_pipeline     + pipelining: send that block before the final verdict
    spec_adaptive     + adaptive draft length (the full system)
    spec_free         the full system without the grammar (what grammar forcing buys)
    auto              per session, the full system or the verifier streaming the target's tokens
                      (cloud AR), whichever the method chooser predicts faster from the previous
                      sessions on the same link (decoding.policy.MethodChooser)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from speculative_vlm.decoding.loop import GenerationResult, SpeculativeDecoder
from speculative_vlm.decoding.models import ModelAdapter
from speculative_vlm.decoding.policy import AUTO as AUTO_METHOD
from speculative_vlm.decoding.policy import SPECULATIVE, AdaptiveLength, FixedLength
from speculative_vlm.decoding.verifier import EARLY_THRESHOLD, SessionRequest, Verifier, VerifierSession


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    kind: str  # "cloud_ar", "edge", "spec" or "auto" (spec or cloud AR, chosen per session)
    preempt: bool = False
    pipeline: bool = False
    adaptive: bool = False
    grammar: bool = True
    exits: bool = False  # verified by the server with early exits

    @property
    def lossless(self) -> bool:
        return self.kind != "edge"


CLOUD_AR = Method("cloud_ar", "cloud autoregressive", "cloud_ar")
EDGE_ONLY = Method("edge_only", "edge-only draft (unverified)", "edge")
VANILLA = Method("spec_vanilla", "speculative, vanilla (draft, send, wait)", "spec")
PREEMPT = Method("spec_preempt", "+ early-exit preemption", "spec", preempt=True, exits=True)
PIPELINE = Method("spec_pipeline", "+ pipelining", "spec", preempt=True, pipeline=True, exits=True)
ADAPTIVE = Method("spec_adaptive", "+ adaptive draft length (full)", "spec", preempt=True, pipeline=True,
                  adaptive=True, exits=True)
FREE = Method("spec_free", "full without grammar forcing (free text)", "spec", preempt=True, pipeline=True,
              adaptive=True, exits=True, grammar=False)
AUTO = Method("auto", "auto (chosen per session)", "auto", preempt=True, pipeline=True, adaptive=True, exits=True)

# Decoded at every RTT profile, in this order for every prompt.
NETWORKED = (CLOUD_AR, VANILLA, PREEMPT, PIPELINE, ADAPTIVE, AUTO)
ALL = (CLOUD_AR, EDGE_ONLY, VANILLA, PREEMPT, PIPELINE, ADAPTIVE, FREE, AUTO)
BY_KEY = {m.key: m for m in ALL}


@dataclass(frozen=True)
class Settings:
    gamma: int = 4  # draft tokens per block for fixed-length rungs (initial length for adaptive)
    max_gamma: int = 8
    early_threshold: float = EARLY_THRESHOLD
    verdict_timeout_s: float = 120.0


class OpenTimer(Verifier):
    """A Verifier that passes through and times ``open`` (prompt prefill on the target + one round trip)."""

    def __init__(self, inner: Verifier):
        self.inner = inner
        self.last_open_s = 0.0

    def open(self, request: SessionRequest) -> VerifierSession:
        start = time.perf_counter()
        session = self.inner.open(request)
        self.last_open_s = time.perf_counter() - start
        return session

    def open_autoregressive(self, request: SessionRequest):
        """The inner verifier's streaming mode (the auto method's cloud AR sessions)."""
        start = time.perf_counter()
        session = self.inner.open_autoregressive(request)
        self.last_open_s = time.perf_counter() - start
        return session


def decoder_for(method: Method, draft: ModelAdapter, verifier: Verifier, settings: Settings) -> SpeculativeDecoder:
    """A decoder for one command (``auto``: for one link, kept across its commands: it learns from them)."""
    policy = (AdaptiveLength(initial=settings.gamma, max_length=settings.max_gamma) if method.adaptive
              else FixedLength(settings.gamma))
    return SpeculativeDecoder(draft, verifier, policy=policy, preempt=method.preempt, pipeline=method.pipeline,
                              early_threshold=settings.early_threshold,
                              verdict_timeout_s=settings.verdict_timeout_s,
                              method=AUTO_METHOD if method.kind == "auto" else SPECULATIVE)


def record(method: Method, result: GenerationResult, open_s: float, reference: list[int]) -> dict:
    """One command's row: outcome, timings summed over rounds, and whether it equals the target's."""
    out = result.token_ids
    diverged = next((i for i, (a, b) in enumerate(zip(out, reference, strict=False)) if a != b),
                    -1 if len(out) == len(reference) else min(len(out), len(reference)))
    return {
        "method": method.key,
        "wall_s": result.wall_s,
        "open_s": open_s,
        "tokens": len(out),
        "passes": result.target_passes,
        "drafted": result.drafted,
        "accepted": result.accepted,
        "draft_s": sum(r.draft_s for r in result.rounds),
        "verify_s": sum(r.verify_s for r in result.rounds),
        "wait_s": sum(r.wait_s for r in result.rounds),
        "early_hits": result.early_hits,
        "early_misses": result.early_misses,
        "early_low": sum(r.early == "low" for r in result.rounds),  # an exit answered, below the threshold
        "chosen": result.method,  # what the session ran: speculative or cloud_ar (streamed)
        "first_block": result.rounds[0].drafted if result.rounds else 0,  # the draft length it started with
        "choice": result.choice,
        "exact": diverged == -1,
        "first_divergence": diverged,
        "text": result.text,
    }

# In one process the drafter and the target share the cores, so preemption has nothing to
# overlap with: the one-process comparison runs the fixed and the adaptive length without it.
ADAPTIVE_INPROCESS = Method("spec_adaptive_nopreempt", "speculative, adaptive length (no preemption)", "spec",
                            adaptive=True)
BY_KEY[ADAPTIVE_INPROCESS.key] = ADAPTIVE_INPROCESS
