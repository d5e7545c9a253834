"""Distil the target into the draft on the target's own answers, within a wall-clock budget.

Loss per answer token: cross-entropy against the target's top-k distribution
(renormalised over the k; under the grammar mask for command answers) plus half the
cross-entropy against the token the target chose. Only answer tokens are trained: the
prompt is context the draft reads, never text it drafts. The learning rate follows a
cosine over the time budget rather than a step count, so a run ends on time on a busy
machine and still anneals.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from speculative_vlm.decoding.models import common_prefix
from speculative_vlm.training.draft_model import ProjectedDraft
from speculative_vlm.training.teacher_data import Example


@dataclass(frozen=True)
class TrainSettings:
    minutes: float = 11.0
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 30
    ce_weight: float = 0.5
    max_steps: int | None = None  # stop earlier than the budget (tests)
    seed: int = 0
    log_every: int = 20


@dataclass(frozen=True)
class TrainReport:
    steps: int
    examples_seen: int
    minutes: float
    last_loss: float
    last_top1: float  # share of the batch's answer tokens where the draft's top-1 is the target's


@dataclass
class Batch:
    prefix: torch.Tensor  # (P,) prompt tokens every example of the batch starts with
    suffix: torch.Tensor  # (B, T) the rest of each prompt and its answer, right-padded
    attention_mask: torch.Tensor  # (B, P + T)
    position_ids: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (N,) row of each answer prediction
    cols: torch.Tensor  # (N,) suffix position whose output predicts that answer token
    targets: torch.Tensor  # (N,) the target's token
    topk_ids: torch.Tensor  # (N, k)
    topk_p: torch.Tensor  # (N, k) the target's probabilities renormalised over its top k


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Pack examples into one batch: their shared prompt prefix once, then right-padded suffixes."""
    seqs = [e.prompt_ids + e.answer_ids for e in examples]
    shared = min(common_prefix([e.prompt_ids for e in examples]), min(len(e.prompt_ids) for e in examples) - 1)
    width = max(len(s) for s in seqs) - shared
    suffix = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    rows, cols, targets, tids, tlp = [], [], [], [], []
    for r, (e, s) in enumerate(zip(examples, seqs, strict=True)):
        suffix[r, : len(s) - shared] = torch.tensor(s[shared:])
        mask[r, shared : len(s)] = 1
        n = len(e.answer_ids)
        start = len(e.prompt_ids) - 1 - shared  # the output at the last prompt token predicts answer[0]
        rows.extend([r] * n)
        cols.extend(range(start, start + n))
        targets.extend(e.answer_ids)
        tids.append(torch.from_numpy(e.topk_ids.astype("int64")))
        tlp.append(torch.from_numpy(e.topk_logp.astype("float32")))
    positions = torch.arange(shared, shared + width).expand(len(seqs), width)
    logp = torch.cat(tlp)
    # Tokens outside the grammar carry -inf; softmax gives them zero weight.
    return Batch(torch.tensor(seqs[0][:shared], dtype=torch.long), suffix, mask, positions, torch.tensor(rows),
                 torch.tensor(cols), torch.tensor(targets), torch.cat(tids), torch.softmax(logp, dim=-1))


def batches(examples: Sequence[Example], size: int, pad_id: int, rng: random.Random) -> Iterator[Batch]:
    """Shuffled batches of one kind each (so they share a system prompt), epoch after epoch, forever."""
    kinds = sorted({e.kind for e in examples})
    while True:
        chunks = []
        for kind in kinds:
            order = [i for i, e in enumerate(examples) if e.kind == kind]
            rng.shuffle(order)
            chunks += [order[i : i + size] for i in range(0, len(order), size) if len(order[i : i + size]) >= 2]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield collate([examples[j] for j in chunk], pad_id)


def head_vocabulary(examples: Sequence[Example]) -> torch.Tensor:
    """Every token the target ranked in its top k (with a finite log-prob) anywhere in the data."""
    ids = [torch.from_numpy(e.topk_ids[np.isfinite(e.topk_logp)].astype("int64")) for e in examples]
    return torch.unique(torch.cat(ids))


def loss_on(draft: ProjectedDraft, batch: Batch, ce_weight: float, head: torch.Tensor,
            negatives: int = 1024, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Distillation loss of one batch and the draft's top-1 agreement with the target.

    The softmax runs over ``head`` (all tokens the target ever ranked) plus ``negatives``
    random other tokens: the full 49,152 would cost most of the step, and the tokens the
    target never proposes only need pushing down, which random negatives do.
    """
    vocab_size = draft.target_embedding.shape[0]
    extra = torch.randint(0, vocab_size, (negatives,), generator=generator)
    out_vocab = torch.unique(torch.cat([head, batch.topk_ids.flatten(), batch.targets, extra]))
    vocab = torch.unique(torch.cat([out_vocab, batch.prefix, batch.suffix.flatten()]))
    embedded = draft.embed_rows(vocab)
    hidden = draft.hidden_states(batch.prefix, batch.suffix, batch.attention_mask, batch.position_ids,
                                 vocab, embedded)
    picked = hidden[batch.rows, batch.cols]
    logq = torch.log_softmax(picked @ embedded[torch.searchsorted(vocab, out_vocab)].T, dim=-1)
    kd = -(batch.topk_p * logq.gather(1, torch.searchsorted(out_vocab, batch.topk_ids))).sum(-1)
    target_idx = torch.searchsorted(out_vocab, batch.targets)
    ce = -logq.gather(1, target_idx[:, None]).squeeze(1)
    top1 = (logq.argmax(-1) == target_idx).float().mean().item()
    return (kd + ce_weight * ce).mean(), top1


def distil(
    draft: ProjectedDraft,
    examples: Sequence[Example],
    pad_id: int,
    settings: TrainSettings = TrainSettings(),
    log: Callable[[str], None] = print,
) -> TrainReport:
    """Train ``draft`` on ``examples`` until the time budget (or ``max_steps``) is spent."""
    if len(examples) < settings.batch_size:
        raise ValueError(f"{len(examples)} examples cannot fill one batch of {settings.batch_size}; "
                         "collect more prompts or lower --batch-size")
    torch.manual_seed(settings.seed)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget = settings.minutes * 60.0
    began = time.monotonic()
    stream = batches(examples, settings.batch_size, pad_id, random.Random(settings.seed))
    head = head_vocabulary(examples)
    negatives = torch.Generator().manual_seed(settings.seed)
    log(f"[train] softmax over the {len(head)} tokens the target ranked, plus random negatives")
    draft.train()
    step, loss_value, top1 = 0, float("nan"), 0.0
    while True:
        elapsed = time.monotonic() - began
        if elapsed >= budget or (settings.max_steps is not None and step >= settings.max_steps):
            break
        warm = min(1.0, (step + 1) / settings.warmup_steps)
        frac = elapsed / budget if settings.max_steps is None else step / settings.max_steps
        for group in optimiser.param_groups:
            group["lr"] = settings.lr * warm * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        loss, top1 = loss_on(draft, next(stream), settings.ce_weight, head, generator=negatives)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        step += 1
        loss_value = loss.item()
        if step % settings.log_every == 0:
            log(f"[train] step {step}: loss {loss_value:.3f}, top-1 {top1:.3f}, "
                f"{elapsed / 60:.1f}/{settings.minutes:.1f} min")
    draft.eval()
    minutes = (time.monotonic() - began) / 60
    log(f"[train] done: {step} steps, {step * settings.batch_size} examples seen, {minutes:.1f} min")
    return TrainReport(step, step * settings.batch_size, minutes, loss_value, top1)
