"""`speculative-vlm train-exits`: train early-exit adapters by self-distillation.

The target generates answers to robot-instruction prompts (greedy, optionally under the
command grammar; all prompts batched through :meth:`TargetEngine.verify` with empty
blocks). One pass over each prompt + answer then records, at every exit layer, the hidden
state, and at the last layer the target's own next-token distribution (the teacher). Each
exit adapter is trained to match the teacher (KL over the teacher's top tokens), the
target itself frozen. Agreement = the share of answer positions where the exit's argmax
equals the final layer's, measured on held-out prompts before and after training.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from speculative_vlm.decoding.exits import ExitAdapter, ExitHeads, save_exit_heads
from speculative_vlm.decoding.models import ModelAdapter
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import DraftBlock, GenerationSettings, SessionRequest

OBJECTS = ["red ball", "blue chair", "green box", "open door", "person in a yellow jacket", "orange cone", "black bag"]
PLACES = ["ahead", "ahead, slightly left", "ahead, slightly right", "to the left", "to the right", "behind you"]
VERBS = ["walk to", "go to", "approach", "move towards", "come close to"]
OTHERS = ["sit down", "stand up", "stop", "lie down", "turn around slowly", "back up a little", "you are done, rest"]


def instruction_prompts(n: int, seed: int = 0) -> list[str]:
    """Robot instructions from templates (objects, distances, directions, other commands)."""
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        if rng.random() < 0.2:
            prompts.append(rng.choice(OTHERS))
        else:
            d = rng.choice([0.5, 1, 1.5, 2, 3, 4])
            prompts.append(f"the {rng.choice(OBJECTS)} is {d} m {rng.choice(PLACES)}; {rng.choice(VERBS)} it")
    return prompts


SYSTEM = (
    "You control a quadruped robot. Answer with one JSON command: action (move, stop, stand_up, "
    "stand_down, sit, done), vx and vy in m/s, vyaw in rad/s, duration in s."
)


def generate_answers(engine: TargetEngine, prompts: list[str], settings: GenerationSettings) -> list[list[int]]:
    """Full ids (prompt + greedy answer) per prompt, all sessions batched per step."""
    sessions = [engine.open_session(SessionRequest(p, system=SYSTEM, settings=settings)) for p in prompts]
    step = 0
    while True:
        live = [s for s in sessions if not s.done]
        if not live:
            break
        for result in engine.verify([(s, DraftBlock(step, len(s.output), (), ())) for s in live]):
            if isinstance(result, Exception):
                raise result
        step += 1
    out = [list(s.kv.ids) for s in sessions]
    for s in sessions:
        engine.close_session(s)
    return out


@dataclass
class Features:
    hidden: dict[int, torch.Tensor]  # layer -> (N, H) at answer positions (and prompt tail)
    teacher_idx: torch.Tensor  # (N, K) top tokens of the final layer
    teacher_logp: torch.Tensor  # (N, K) their log-probs
    final_argmax: torch.Tensor  # (N,)


@torch.inference_mode()
def collect(target: ModelAdapter, sequences: list[tuple[list[int], int]], layers: list[int], top_k: int) -> Features:
    """Hidden states at the exit layers and the teacher's top-k, at every answer position."""
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    idx, logp, best = [], [], []
    for ids, prompt_len in sequences:
        out = target.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        # Positions predicting answer tokens: from the last prompt token to the last-but-one id.
        sl = slice(prompt_len - 1, len(ids) - 1)
        for layer in layers:
            # hidden_states[0] is the embedding output; layer l's output is hidden_states[l + 1].
            hidden[layer].append(out.hidden_states[layer + 1][0, sl].float())
        logits = out.logits[0, sl].float()
        lp = torch.log_softmax(logits, -1)
        top = torch.topk(lp, top_k, dim=-1)
        idx.append(top.indices)
        logp.append(top.values)
        best.append(logits.argmax(-1))
    return Features(
        {k: torch.cat(v) for k, v in hidden.items()}, torch.cat(idx), torch.cat(logp), torch.cat(best)
    )


@torch.inference_mode()
def agreement(heads: ExitHeads, feats: Features) -> dict[int, float]:
    return {
        layer: float((heads.logits(layer, feats.hidden[layer]).argmax(-1) == feats.final_argmax).float().mean())
        for layer in heads.layers
    }


def train_layer(
    target: ModelAdapter, adapter: ExitAdapter, hidden: torch.Tensor, feats: Features, steps: int, lr: float
) -> None:
    # The loss is computed over the union of the teacher's top tokens only: the head's
    # full 49k-column matmul per step would dominate the cost on a CPU.
    vocab = torch.unique(feats.teacher_idx)
    remap = torch.full((target.vocab_size,), -1, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    cols = remap[feats.teacher_idx]
    teacher = torch.softmax(feats.teacher_logp, -1)  # renormalised over its top-k
    weight = target.lm_head.weight.detach()[vocab].float()
    norm = target.final_norm
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    batch = min(512, hidden.shape[0])
    adapter.train()
    for _ in range(steps):
        pick = torch.randint(0, hidden.shape[0], (batch,), generator=gen)
        h = adapter(hidden[pick])
        logits = norm(h.to(target.dtype)).float() @ weight.T
        logp = torch.log_softmax(logits, -1).gather(-1, cols[pick])
        loss = -(teacher[pick] * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter.eval()


def train_exits(
    target: ModelAdapter,
    layers: list[int],
    train_prompts: int = 48,
    heldout_prompts: int = 12,
    steps: int = 300,
    lr: float = 3e-3,
    inner: int = 256,
    top_k: int = 32,
    grammar: str = "command",
    max_new_tokens: int = 64,
    log=print,
) -> tuple[ExitHeads, dict]:
    start = time.monotonic()
    for p in target.model.parameters():
        p.requires_grad_(False)
    engine = TargetEngine(target, max_batch=64)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, grammar=grammar)
    prompts = instruction_prompts(train_prompts + heldout_prompts, seed=1)
    seqs = []
    for p, ids in zip(prompts, generate_answers(engine, prompts, settings), strict=True):
        plen = len(target.encode(SessionRequest(p, system=SYSTEM, settings=settings)).ids)
        seqs.append((ids, plen))
    generated_at = time.monotonic()
    log(f"generated {len(seqs)} answers ({sum(len(i) - n for i, n in seqs)} tokens) in {generated_at - start:.0f} s")
    train = collect(target, seqs[:train_prompts], layers, top_k)
    held = collect(target, seqs[train_prompts:], layers, top_k)
    collected_at = time.monotonic()
    before = agreement(ExitHeads(target, layers), held)
    train_before = agreement(ExitHeads(target, layers), train)
    adapters = {layer: ExitAdapter(target.hidden_size, inner) for layer in layers}
    for layer in layers:
        train_layer(target, adapters[layer], train.hidden[layer], train, steps, lr)
    heads = ExitHeads(target, layers, adapters)
    after = agreement(heads, held)
    train_after = agreement(heads, train)
    report = {
        "layers": layers,
        "train_positions": int(train.final_argmax.shape[0]),
        "heldout_positions": int(held.final_argmax.shape[0]),
        "agreement_before": {str(k): round(v, 4) for k, v in before.items()},
        "agreement_after": {str(k): round(v, 4) for k, v in after.items()},
        "train_agreement_before": {str(k): round(v, 4) for k, v in train_before.items()},
        "train_agreement_after": {str(k): round(v, 4) for k, v in train_after.items()},
        "seconds": round(time.monotonic() - start, 1),
        "seconds_generating": round(generated_at - start, 1),
        "seconds_collecting": round(collected_at - generated_at, 1),
        "seconds_training": round(time.monotonic() - collected_at, 1),
    }
    return heads, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="target model folder or model-store name")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="exit layers to train")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (for --exit-heads)")
    parser.add_argument("--train-prompts", type=int, default=48)
    parser.add_argument("--heldout-prompts", type=int, default=12)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--inner", type=int, default=256, help="adapter width")
    parser.add_argument("--grammar", default="command", choices=["", "command"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from speculative_vlm.decoding.models import load_model

    target = load_model(args.target)
    heads, report = train_exits(
        target,
        args.layers,
        train_prompts=args.train_prompts,
        heldout_prompts=args.heldout_prompts,
        steps=args.steps,
        lr=args.lr,
        inner=args.inner,
        grammar=args.grammar,
        max_new_tokens=args.max_new_tokens,
        log=(lambda *_: None) if args.json else print,
    )
    path = save_exit_heads(heads, args.out, target, report)
    report["checkpoint"] = str(path)
    if args.json:
        print(json.dumps(report))
    else:
        print("layer  agreement before -> after (held-out answer positions)")
        for layer in report["layers"]:
            print(f"{layer:5d}  {report['agreement_before'][str(layer)]:.3f} -> {report['agreement_after'][str(layer)]:.3f}")
        print(f"checkpoint: {path}")
    return 0
