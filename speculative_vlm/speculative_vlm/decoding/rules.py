"""Verification rules: greedy exact match and lossless rejection sampling.

Both sides turn logits into a distribution with :func:`warp` (temperature, then top-k,
then top-p), so a draft's ``q`` and the target's ``p`` are shaped identically. Sampling
verification is the standard rule (Leviathan et al. 2023; Chen et al. 2023): accept draft
token ``x`` with probability ``min(1, p(x) / q(x))``; at the first rejection sample from the
residual ``max(0, p - q)`` renormalised; if all are accepted sample a bonus token from
``p``. The output then follows the target's own distribution exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speculative_vlm.decoding.verifier import GenerationSettings


@dataclass(frozen=True)
class Outcome:
    accepted: int  # leading draft tokens accepted
    token: int  # correction (at the first rejection) or bonus token


def warp(logits: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """Probabilities over the last dim after temperature, top-k and top-p (fp32)."""
    logits = logits.float() / max(settings.temperature, 1e-6)
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= settings.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def pick(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """Choose one token from logits (V,): argmax when greedy, else a sample; returns (token, probs or None)."""
    if settings.greedy:
        return int(torch.argmax(logits)), None
    probs = warp(logits, settings)
    return int(torch.multinomial(probs, 1, generator=generator)), probs


def verify_greedy(logits: torch.Tensor, drafts: Sequence[int]) -> Outcome:
    """``logits`` (k+1, V): accept the longest prefix equal to the argmax; the next argmax is the token."""
    best = torch.argmax(logits, dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and best[accepted] == drafts[accepted]:
        accepted += 1
    return Outcome(accepted, int(best[accepted]))


def verify_sampling(
    logits: torch.Tensor,
    drafts: Sequence[int],
    q: Sequence[dict[int, float]] | None,
    settings: GenerationSettings,
    generator: torch.Generator,
) -> Outcome:
    """Lossless rejection sampling; ``q`` is the draft's sparse distribution per token (None: greedy draft).

    A greedy draft is a draft whose ``q`` is one-hot on the drafted token, so the same rule
    stays lossless for it.
    """
    probs = warp(logits, settings)
    for i, x in enumerate(drafts):
        p = probs[i]
        q_vec = torch.zeros_like(p)
        if q is not None and q[i]:
            idx = torch.tensor(list(q[i].keys()), dtype=torch.long)
            q_vec[idx] = torch.tensor(list(q[i].values()), dtype=p.dtype)
        if float(q_vec[x]) <= 0.0:
            q_vec.zero_()
            q_vec[x] = 1.0
        ratio = float(p[x]) / float(q_vec[x])
        u = float(torch.rand((), generator=generator))
        if u < min(1.0, ratio):
            continue
        residual = torch.clamp(p - q_vec, min=0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p == q numerically: any sample of p is right
            residual, total = p, float(p.sum())
        return Outcome(i, int(torch.multinomial(residual / total, 1, generator=generator)))
    return Outcome(len(drafts), int(torch.multinomial(probs[len(drafts)], 1, generator=generator)))


def sparse(probs: torch.Tensor, limit: int = 64, floor: float = 0.0) -> dict[int, float]:
    """The nonzero entries of a distribution as {token: prob} (at most ``limit``, largest first).

    Exact when the warped distribution has at most ``limit`` nonzero entries (top-k <= limit);
    otherwise the tail beyond ``limit`` is left out and verification treats it as q = 0.
    """
    nz = int((probs > floor).sum())
    values, idx = torch.topk(probs, min(limit, max(nz, 1)))
    return {int(i): float(v) for i, v in zip(idx.tolist(), values.tolist(), strict=True) if v > floor}
