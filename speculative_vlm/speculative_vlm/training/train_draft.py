"""`speculative-vlm train-draft`: collect the target's answers, distil a draft, measure, write a card.

One command from a bare target to a shipped draft: the target answers robot-command
prompts under the command grammar (and some general instructions), answers are cached on
disk, a small Llama draft is distilled within a time budget, saved as a standard HF
causal LM (fp16, with the target's tokenizer), reloaded from disk and measured against
the target on held-out prompts. The card records the recipe and the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

SHIPPED_DRAFT = Path(__file__).resolve().parents[2] / "models" / "command-draft"
DEFAULT_CACHE = Path.home() / ".cache" / "speculative_vlm" / "draft-data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2-135m-instruct", help="target model folder or store name")
    parser.add_argument("--out", type=Path, default=SHIPPED_DRAFT, help="where to write the draft and card.md")
    parser.add_argument("--prompts", type=int, default=1152, help="robot-command training prompts")
    parser.add_argument("--general", type=int, default=192, help="general-instruction training prompts")
    parser.add_argument("--heldout", type=int, default=64, help="held-out command prompts (half as many general)")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time budget in minutes")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps")
    parser.add_argument("--data-cache", type=Path, default=DEFAULT_CACHE, help="cache of the target's answers")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--gamma", type=int, default=4, help="tokens per block when measuring acceptance")
    parser.add_argument("--gen-batch", type=int, default=32, help="prompts per batched generation (and cache shard)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from speculative_vlm.decoding.model_store import resolve
    from speculative_vlm.training.acceptance import measure
    from speculative_vlm.training.distill import TrainSettings, distil
    from speculative_vlm.training.draft_model import DraftShape, ProjectedDraft
    from speculative_vlm.training.teacher_data import DataSpec, TeacherData

    began = time.monotonic()
    torch.set_num_threads(args.threads)
    target_dir = resolve(args.target)
    print(f"[train-draft] target {target_dir}; answers cached under {args.data_cache}", flush=True)
    teacher = TeacherData(target_dir, args.data_cache)
    heldout = teacher.collect(DataSpec(commands=args.heldout, general=max(args.heldout // 2, 1), seed="heldout",
                                       batch_size=args.gen_batch))
    train = teacher.collect(DataSpec(commands=args.prompts, general=args.general, seed="train",
                                     batch_size=args.gen_batch))

    shape = DraftShape(layers=args.layers, hidden=args.hidden, intermediate=3 * args.hidden,
                       heads=max(args.hidden // 64, 1), kv_heads=max(args.hidden // 64, 1))
    draft = ProjectedDraft(teacher.model.get_input_embeddings().weight, teacher.model.config, shape)
    target_config = teacher.model.config
    teacher.model = None  # the target is no longer needed; free its memory for training
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    print(f"[train-draft] draft {shape}, {trainable / 1e6:.2f}M trainable parameters; "
          f"{len(train)} training answers", flush=True)
    settings = TrainSettings(minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps)
    report = distil(draft, train, pad_id=teacher.pad_id, settings=settings,
                    log=lambda s: print(s, flush=True))

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    llama = draft.materialise().to(torch.float16)
    llama.save_pretrained(out)
    teacher.tokenizer.save_pretrained(out)
    size_mb = _folder_mb(out)

    # Measure what ships: the saved folder, loaded the way the engine loads it.
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    commands = [e for e in heldout if e.kind == "command"]
    general = [e for e in heldout if e.kind == "general"]
    print("[train-draft] measuring acceptance on held-out prompts", flush=True)
    cmd = measure(shipped, commands, args.gamma, teacher.compiled, frozenset(teacher.stop_ids))
    forced = measure(shipped, commands, args.gamma, teacher.compiled, frozenset(teacher.stop_ids), force=True)
    gen = measure(shipped, general, args.gamma, None, frozenset(teacher.stop_ids))
    print(f"[train-draft] commands: {cmd.line()}", flush=True)
    print(f"[train-draft] commands with grammar forcing: {forced.line()}", flush=True)
    print(f"[train-draft] general:  {gen.line()}", flush=True)

    metrics = {
        "target": str(target_dir.name),
        "gamma": args.gamma,
        "commands": {**asdict(cmd), "acceptance": cmd.acceptance, "tokens_per_pass": cmd.tokens_per_pass},
        "commands_forced": {**asdict(forced), "acceptance": forced.acceptance,
                            "tokens_per_pass": forced.tokens_per_pass},
        "general": {**asdict(gen), "acceptance": gen.acceptance, "tokens_per_pass": gen.tokens_per_pass},
        "training": asdict(report),
        "shape": asdict(shape),
        "trainable_parameters": trainable,
        "data": {"command_prompts": args.prompts, "general_prompts": args.general,
                 "heldout_command": len(commands), "heldout_general": len(general),
                 "answer_tokens": sum(len(e.answer_ids) for e in train)},
        "folder_mb": round(size_mb, 1),
        "total_minutes": round((time.monotonic() - began) / 60, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "card.md").write_text(_card(args, metrics, target_config, cmd.line(), forced.line(), gen.line()))
    print(f"[train-draft] wrote {out} ({size_mb:.1f} MB) in {metrics['total_minutes']} min", flush=True)
    return 0


def _card(args, m: dict, target_config, cmd_line: str, forced_line: str, gen_line: str) -> str:
    t, d, s = m["training"], m["data"], m["shape"]
    command = "speculative-vlm train-draft " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "speculative-vlm train-draft"
    return f"""# command-draft: a distilled draft for {m['target']}

A {s['layers']}-layer Llama (hidden {s['hidden']}, MLP {s['intermediate']}, {s['heads']} heads) on the
target's vocabulary ({target_config.vocab_size} tokens, same tokenizer, saved here). It loads with
`AutoModelForCausalLM.from_pretrained` on this folder; weights fp16, {m['folder_mb']} MB.

## Data recipe
- Robot-command prompts: {d['command_prompts']} from `speculative_vlm.commands.prompts.sample_task`
  (random scenes of 0-4 coloured objects around a robot at a random pose, described by
  `scene_text.describe_objects`; instructions from templates: go to / face / avoid an
  object, a missing object, plain motions), rendered with the system prompt of `prompts.py`.
- Answers: the target's own greedy output under the engine's command grammar
  (`speculative_vlm.commands.grammar`, grammar "command"), with its top-32 log-probs
  after the grammar mask; {d['answer_tokens']} answer tokens in all (commands and general).
- General instructions: {d['general_prompts']} template questions (`training/general_prompts.py`),
  answered by the target unconstrained (at most 48 tokens), meant to keep the draft
  usable outside the command domain (the general acceptance below says how far it gets).
- Held out: {d['heldout_command']} command and {d['heldout_general']} general prompts from another seed.

## Training
- Tied embedding = the target's embedding x a learnt 576->{s['hidden']} projection (initialised
  with its principal directions), folded into a plain embedding before saving.
  {m['trainable_parameters'] / 1e6:.2f}M trainable parameters.
- Loss per answer token: cross-entropy to the target's top-32 distribution + 0.5 x
  cross-entropy to the target's token. AdamW, lr {args.lr}, cosine over the time budget,
  batch {args.batch_size}.
- {t['steps']} steps ({t['examples_seen']} examples) in {t['minutes']:.1f} min on {args.threads} CPU thread(s)
  ({platform.processor() or platform.machine()}); whole run {m['total_minutes']} min.

## Acceptance against the target (held-out prompts, greedy, lossless verification)
- Robot commands, draft masked by the same grammar, every token drafted: {cmd_line}.
- The same with grammar forcing (tokens the grammar allows alone are appended without a
  draft or a target pass, as the engine does): {forced_line}.
- General instructions, unconstrained: {gen_line}.

Replayed with `speculative_vlm.training.acceptance.measure` on the saved folder: the
target's greedy answer is known, so a round accepts the longest drafted prefix equal to it
plus the target's next token, exactly as lossless greedy verification would.

## Reproduce
`{command}` (answers are reused from `--data-cache` when present).
"""
