"""LoRA fine-tuning of a causal LM on (prompt, answer) token pairs, loss on the answer tokens only.

The method is ``peft``'s LoRA: low-rank adapters on the attention and MLP projections of every
layer, the base weights frozen. The loop is written here because one trick matters on a CPU: every
robot prompt starts with the same ~190 tokens (system prompt and chat template) and only ~40 differ,
so a batch runs that shared prefix *once* (its keys and values repeated across the batch, gradients
flowing back through them) and then only each example's suffix and answer: about a third of the
tokens a plain batch would push through the model, for exactly the same loss and gradients.

Training is reproducible: the data order is a seeded permutation per epoch, the schedule (linear
warm-up, cosine decay) is by step, and ``torch`` is seeded. ``minutes`` is a hard cap on the
training time that stops a run early on a slow machine; the report says when it did.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from speculative_vlm.decoding.models import common_prefix
from speculative_vlm.training.target_data import TokenExample

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = LLAMA_PROJECTIONS


@dataclass(frozen=True)
class FitSettings:
    epochs: float = 1.0  # passes over the data (a fraction runs part of the last one)
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0
    minutes: float = 75.0  # hard cap on the training time
    max_steps: int | None = None  # stop after this many steps (tests, pilots); the schedule still spans all
    log_every: int = 10
    # Mixed precision: the forward pass under torch.autocast in this dtype ("bfloat16"), the trained weights and
    # the optimiser in float32. None: all float32. bfloat16 took a SmolLM2 LoRA step 1.4x faster on this CPU.
    autocast: str | None = None


@dataclass
class FitReport:
    steps: int
    planned_steps: int
    examples_seen: int
    minutes: float  # training steps only (probes excluded)
    seconds_per_example: float
    stopped_by_cap: bool
    fastest_seconds_per_example: float = 0.0  # the quickest step's: nearest to an idle machine's cost
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, mean loss, mean token accuracy)
    probes: list[tuple[int, float]] = field(default_factory=list)  # (step, probe score)


def add_lora(model, settings: LoraSettings = LoraSettings()):
    """``model`` wrapped by peft with LoRA adapters on ``settings.targets``; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@dataclass
class Batch:
    prefix: torch.Tensor  # (P,) prompt tokens every example of the batch starts with
    suffix: torch.Tensor  # (B, T) the rest of each prompt and its answer, right-padded
    positions: torch.Tensor  # (B, T) position ids, following the prefix
    rows: torch.Tensor  # (N,) batch row of each answer token
    cols: torch.Tensor  # (N,) suffix position whose output predicts it
    targets: torch.Tensor  # (N,) the answer token


def collate(examples: Sequence[TokenExample], pad_id: int) -> Batch:
    """The examples' shared prompt prefix once, then right-padded suffixes (padding is never attended:
    it only follows real tokens, and attention is causal)."""
    seqs = [list(e.prompt_ids) + list(e.answer_ids) for e in examples]
    shared = min(common_prefix([e.prompt_ids for e in examples]), min(len(e.prompt_ids) for e in examples) - 1)
    width = max(len(s) for s in seqs) - shared
    suffix = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, (e, s) in enumerate(zip(examples, seqs, strict=True)):
        suffix[r, : len(s) - shared] = torch.tensor(s[shared:])
        start = len(e.prompt_ids) - 1 - shared  # the output at the last prompt token predicts answer[0]
        rows.extend([r] * len(e.answer_ids))
        cols.extend(range(start, start + len(e.answer_ids)))
        targets.extend(e.answer_ids)
    positions = torch.arange(shared, shared + width).expand(len(seqs), width)
    return Batch(torch.tensor(seqs[0][:shared], dtype=torch.long), suffix, positions, torch.tensor(rows),
                 torch.tensor(cols), torch.tensor(targets))


def batch_order(count: int, batch_size: int, epochs: float, seed: int,
                lengths: Sequence[int] | None = None, window: int = 16) -> list[list[int]]:
    """Example indices of every step: a seeded permutation per epoch cut into batches (same seed, same order).

    With ``lengths``, each run of ``window`` batches of the permutation is sorted by length before it
    is cut, and the epoch's batches are shuffled again: batches of similar lengths pad less.
    """
    steps = max(1, math.ceil(epochs * count / batch_size))
    order: list[list[int]] = []
    epoch = 0
    while len(order) < steps:
        rng = random.Random(f"{seed}:{epoch}")
        perm = list(range(count))
        rng.shuffle(perm)
        if lengths is not None:
            span = batch_size * window
            perm = [i for s in range(0, count, span) for i in sorted(perm[s : s + span], key=lambda j: lengths[j])]
        chunks = [perm[i : i + batch_size] for i in range(0, count, batch_size)]
        if lengths is not None:
            rng.shuffle(chunks)
        order += chunks
        epoch += 1
    return order[:steps]


def batch_loss(model, batch: Batch) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over the batch's answer tokens, and the share the model already gets right.

    ``model`` is a causal LM (a peft model or a plain one); logits are computed only where an answer
    token is predicted, so the 49k-wide head costs nothing on prompt positions.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = lm.get_decoder()
    cache = None
    if batch.prefix.numel():
        cache = decoder(input_ids=batch.prefix[None], use_cache=True).past_key_values
        cache.batch_repeat_interleave(batch.suffix.shape[0])
    hidden = decoder(input_ids=batch.suffix, position_ids=batch.positions, past_key_values=cache,
                     use_cache=cache is not None).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[batch.rows, batch.cols]).float()
    loss = torch.nn.functional.cross_entropy(logits, batch.targets)
    return loss, (logits.argmax(-1) == batch.targets).float().mean().item()


def fit(
    model,
    examples: Sequence[TokenExample],
    pad_id: int,
    settings: FitSettings = FitSettings(),
    log: Callable[[str], None] = print,
    probe: Callable[[], float] | None = None,
    probe_every: int = 0,
    step_loss: Callable[[object, list, int], tuple[torch.Tensor, float]] | None = None,
) -> FitReport:
    """Train ``model``'s trainable parameters on ``examples`` by the settings' schedule.

    ``probe`` (a score of the model as it stands, e.g. held-out direction correctness; run in
    eval mode) is logged every ``probe_every`` steps and after the last; its time is not counted
    as training time. ``step_loss(model, batch examples, step)`` replaces :func:`batch_loss` (the
    VLM target's batches carry images); ``examples`` need ``prompt_ids`` and ``answer_ids`` either way.
    """
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(settings.seed)
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in examples]
    order = batch_order(len(examples), settings.batch_size, settings.epochs, settings.seed, lengths)
    planned = len(order)
    if settings.max_steps is not None:
        order = order[: settings.max_steps]
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device.type
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    report = FitReport(0, planned, 0, 0.0, 0.0, False)

    def run_probe(step: int) -> None:
        if probe is None:
            return
        model.eval()
        with torch.inference_mode():
            score = probe()
        report.probes.append((step, score))
        log(f"[train] probe at step {step}: {score:.3f}")

    model.train()
    trained_s = fastest = 0.0
    window: list[tuple[float, float]] = []
    for step, chunk in enumerate(order, 1):
        if trained_s >= settings.minutes * 60:
            report.stopped_by_cap = True
            log(f"[train] time cap of {settings.minutes:.0f} min reached at step {step - 1} of {planned}")
            break
        began = time.monotonic()
        warm = min(1.0, step / max(settings.warmup_steps, 1))
        for group in optimiser.param_groups:
            group["lr"] = settings.lr * warm * 0.5 * (1 + math.cos(math.pi * (step - 1) / planned))
        batch = [examples[i] for i in chunk]
        with torch.autocast(device, dtype=getattr(torch, settings.autocast or "float32"),
                            enabled=settings.autocast is not None):
            loss, accuracy = step_loss(model, batch, step) if step_loss else batch_loss(model, collate(batch, pad_id))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        took = time.monotonic() - began
        trained_s += took
        fastest = took / len(chunk) if step == 1 else min(fastest, took / len(chunk))
        report.steps, report.examples_seen = step, report.examples_seen + len(chunk)
        window.append((loss.item(), accuracy))
        if step % settings.log_every == 0 or step == len(order):
            mean_loss = sum(w[0] for w in window) / len(window)
            mean_acc = sum(w[1] for w in window) / len(window)
            report.curve.append((step, mean_loss, mean_acc))
            window.clear()
            log(f"[train] step {step}/{planned}: loss {mean_loss:.4f}, answer-token accuracy {mean_acc:.3f}, "
                f"lr {optimiser.param_groups[0]['lr']:.2e}, {trained_s / report.examples_seen:.2f} s/example "
                f"(fastest step {fastest:.2f}), {trained_s / 60:.1f} min, about "
                f"{min(trained_s / step * (len(order) - step), settings.minutes * 60 - trained_s) / 60:.0f} min left")
        if probe_every and step % probe_every == 0 and step != len(order):
            run_probe(step)
            model.train()
    if window:  # steps since the last log line (a run stopped by the cap)
        report.curve.append((report.steps, sum(w[0] for w in window) / len(window),
                             sum(w[1] for w in window) / len(window)))
    model.eval()
    run_probe(report.steps)
    report.minutes = trained_s / 60
    report.seconds_per_example = trained_s / max(report.examples_seen, 1)
    report.fastest_seconds_per_example = fastest
    return report
