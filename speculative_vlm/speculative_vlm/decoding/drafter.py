"""The draft side of one session: propose blocks, follow verdicts, roll back on rejection.

A :class:`Drafter` keeps the draft model's cache over *its* view of the output: the
committed tokens plus whatever it has drafted beyond them. After a verdict it is synced
to the committed output by cropping back to the common prefix (never recomputing the
prompt) and appending the corrected tokens; it can also be moved to an *assumed* output
(an early verdict's guess) to draft preemptively.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from speculative_vlm.decoding import rules
from speculative_vlm.decoding.grammar import apply_mask
from speculative_vlm.decoding.models import ModelAdapter
from speculative_vlm.decoding.target_engine import make_tracker
from speculative_vlm.decoding.verifier import SessionRequest


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]
    q: tuple[dict[int, float], ...] | None  # sparse draft distributions (sampling only)
    seconds: float


class Drafter:
    def __init__(self, model: ModelAdapter, request: SessionRequest):
        self.model = model
        self.settings = request.settings
        if request.draft_prompt:
            request = dataclasses.replace(request, prompt=request.draft_prompt)
        if request.image is not None and not model.is_vlm:
            # A text-only draft serving a VLM target drafts from its prompt's words alone (the scene as the
            # robot describes it when the request carries a draft_prompt, else no scene).
            request = dataclasses.replace(request, image=None)
        self.kv = model.start(model.encode(request))
        self.out = make_tracker(model, request)  # the drafter's view: committed + drafted
        self.generator = torch.Generator(device=model.device).manual_seed(int(request.settings.seed) + 7919)

    @property
    def tokens(self) -> list[int]:
        return self.out.tokens

    def sync(self, output: list[int]) -> None:
        """Make the drafter's view equal ``output`` (keeps the common prefix's cache)."""
        mine = self.out.tokens
        common = 0
        limit = min(len(mine), len(output))
        while common < limit and mine[common] == output[common]:
            common += 1
        self.out.truncate(common)
        self.kv.truncate(self.kv.prompt_len + common)
        rest = output[common:]
        self.out.extend(rest)
        self.kv.append(rest)

    def append_forced(self) -> list[int]:
        forced = self.out.append_forced()
        self.kv.append(forced)
        return forced

    def draft(self, k: int, reserve: int = 1) -> Draft:
        """Draft up to ``k`` tokens after the current view (stops at EOS / grammar end / budget).

        ``reserve`` tokens of the budget are left free: the verifier always adds one (the
        correction or bonus token), so a block never runs past ``max_new_tokens``.
        """
        start = time.perf_counter()
        tokens: list[int] = []
        qs: list[dict[int, float]] = []
        k = min(k, max(0, self.out.room - reserve))
        while len(tokens) < k and not self.out.done:
            mask = self.out.mask()
            logits = self.model.forward([self.kv], head=self.model.narrow_head(mask))[0][-1]
            if mask is not None:
                logits = apply_mask(logits, mask)
            token, probs = rules.pick(logits, self.settings, self.generator)
            if probs is not None:
                qs.append(rules.sparse(probs))
            tokens.append(token)
            self.kv.append([token])
            self.out.extend([token])
        q = tuple(qs) if not self.settings.greedy else None
        return Draft(tuple(tokens), q, time.perf_counter() - start)
