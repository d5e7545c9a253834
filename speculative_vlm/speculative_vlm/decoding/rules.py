"""Verification rules: greedy exact match and lossless rejection sampling.

Both sides turn logits into a distribution with :func:`warp` (temperature, then top-k,
then top-p), so a draft's ``q`` and the target's ``p`` are shaped identically. Sampling
verification is the standard rule (Leviathan et al. 2023; Chen et al. 2023): accept draft
token ``x`` with probability ``min(1, p(x) / q(x))``; at the first rejection sample from the
residual ``max(0, p - q)`` renormalised; if all are accepted sample a bonus token from
``p``. The output then follows the target's own distribution exactly.

Both rules fail closed: a probability that is not a finite number in [0, 1] (a draft's ``q``,
or a target distribution made of ``nan`` by broken settings or a broken model) raises
:class:`InvalidProbability` and never accepts anything (in Python ``min(1.0, nan)`` is 1.0,
so the textbook line would accept every junk token). A row of logits that allows nothing
(every logit -inf: past a grammar's end) accepts nothing and gives no token (-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speculative_vlm.decoding.verifier import GenerationSettings


class InvalidProbability(ValueError):
    """A probability (or logit) that verification cannot decide on: nan, infinite, or outside [0, 1]."""


@dataclass(frozen=True)
class Outcome:
    accepted: int  # leading draft tokens accepted
    token: int  # correction (at the first rejection) or bonus token; -1 when no token is allowed


def acceptance_probability(p: float, q: float) -> float:
    """The chance of accepting a drafted token, ``min(1, p / q)``; raises InvalidProbability unless
    ``p`` is a finite number in [0, 1] and ``q`` one in (0, 1].

    Written so that ``nan`` fails every test (each comparison with nan is False).
    """
    if not 0.0 <= p <= 1.0:
        raise InvalidProbability(f"target probability {p!r} is not a finite number in [0, 1]")
    if not 0.0 < q <= 1.0:
        raise InvalidProbability(f"draft probability {q!r} is not a finite number in (0, 1]")
    return min(1.0, p / q)


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    """Which rows allow some token (bool (k+1,)); raises InvalidProbability on nan or +inf logits."""
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise InvalidProbability("the target's logits hold nan or +inf; the model or its settings are broken")
    return ~torch.isneginf(logits).all(dim=-1)


def _check_draft_distributions(q: Sequence[dict[int, float]], vocab_size: int) -> None:
    """Raise InvalidProbability unless every entry has an id in the vocabulary and a probability in [0, 1]."""
    for position, dist in enumerate(q):
        for t, v in (dist or {}).items():
            if not (isinstance(t, int) and 0 <= t < vocab_size) or not 0.0 <= v <= 1.0:
                raise InvalidProbability(f"draft distribution {position} has entry {t!r}: {v!r}; ids must be in "
                                         f"[0, {vocab_size}) and probabilities finite numbers in [0, 1]")


def _draft_distribution(q: dict[int, float] | None, token: int, like: torch.Tensor) -> torch.Tensor:
    """The draft's dense q for one position (checked), one-hot on ``token`` when it left ``token`` out."""
    q_vec = torch.zeros_like(like)
    if q:
        ids = torch.tensor(list(q.keys()), dtype=torch.long, device=like.device)
        q_vec[ids] = torch.tensor(list(q.values()), dtype=like.dtype, device=like.device)
    if not float(q_vec[token]) > 0.0:  # the draft left its own token out: a greedy (one-hot) draft
        q_vec.zero_()
        q_vec[token] = 1.0
    return q_vec


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
    """``logits`` (k+1, V): accept the longest prefix equal to the argmax; the next argmax is the token.

    A row that allows nothing accepts nothing and gives no token; nan or +inf logits raise.
    Everything is decided on the logits' device and read back in one small copy (one wait on
    a GPU, however long the block).
    """
    broken = (torch.isnan(logits) | torch.isposinf(logits)).any().reshape(1)
    allows = ~torch.isneginf(logits).all(dim=-1)
    best = torch.argmax(logits, dim=-1)
    read = torch.cat([broken.long(), allows.long(), best]).tolist()
    if read[0]:
        raise InvalidProbability("the target's logits hold nan or +inf; the model or its settings are broken")
    k1 = logits.shape[0]
    allows, best = read[1 : 1 + k1], read[1 + k1 :]
    accepted = 0
    while accepted < len(drafts) and allows[accepted] and best[accepted] == drafts[accepted]:
        accepted += 1
    return Outcome(accepted, int(best[accepted]) if allows[accepted] else -1)


def verify_sampling(
    logits: torch.Tensor,
    drafts: Sequence[int],
    q: Sequence[dict[int, float]] | None,
    settings: GenerationSettings,
    generator: torch.Generator,
) -> Outcome:
    """Lossless rejection sampling; ``q`` is the draft's sparse distribution per token (None: greedy draft).

    A greedy draft is a draft whose ``q`` is one-hot on the drafted token, so the same rule
    stays lossless for it. Fails closed: a ``q`` entry or a target probability that is not a
    finite number in [0, 1] raises InvalidProbability before anything is accepted.
    """
    if q is not None:
        if len(q) < len(drafts):
            raise InvalidProbability(f"{len(q)} draft distributions for {len(drafts)} drafted tokens")
        _check_draft_distributions(q, logits.shape[-1])
    allows = _check_logits(logits)
    probs = warp(logits, settings)
    # Rows that allow nothing are nan after the softmax: they are all zero (nothing can be chosen).
    probs = torch.where(allows[:, None], probs, torch.zeros_like(probs))
    if not bool(torch.isfinite(probs).all()):
        raise InvalidProbability("the target's distribution is not finite; check temperature, top_k and top_p")
    for i, x in enumerate(drafts):
        p = probs[i]
        q_vec = _draft_distribution(q[i] if q is not None else None, x, p)
        ratio = acceptance_probability(float(p[x]), float(q_vec[x]))
        u = float(torch.rand((), generator=generator, device=generator.device))
        if u < ratio:
            continue
        residual = torch.clamp(p - q_vec, min=0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p == q numerically: any sample of p is right
            residual, total = p, float(p.sum())
        if not total > 0.0:  # nothing is allowed here
            return Outcome(i, -1)
        return Outcome(i, int(torch.multinomial(residual / total, 1, generator=generator)))
    bonus = probs[len(drafts)]
    if not float(bonus.sum()) > 0.0:
        return Outcome(len(drafts), -1)
    return Outcome(len(drafts), int(torch.multinomial(bonus, 1, generator=generator)))


def sparse(probs: torch.Tensor, limit: int = 64, floor: float = 0.0) -> dict[int, float]:
    """The nonzero entries of a distribution as {token: prob} (at most ``limit``, largest first).

    Exact when the warped distribution has at most ``limit`` nonzero entries (top-k <= limit);
    otherwise the tail beyond ``limit`` is left out and verification treats it as q = 0.
    """
    nz = int((probs > floor).sum())
    values, idx = torch.topk(probs, min(limit, max(nz, 1)))
    return {int(i): float(v) for i, v in zip(idx.tolist(), values.tolist(), strict=True) if v > floor}
