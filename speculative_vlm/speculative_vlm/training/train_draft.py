"""`speculative-vlm train-draft`: collect the target's answers, distil a draft, measure, write a card.

One command from a target to a shipped draft: the target answers the robot's own requests under
the command grammar (prompts from the train-split rollouts ``train-target`` learns from, with the
odometry progress line; see :mod:`.teacher_data`) and some general instructions, answers are
cached on disk, a small Llama draft is distilled within a time budget, saved as a standard HF
causal LM (fp16, with the target's tokenizer), reloaded from disk and measured against the target
on prompts of the evaluation's held-out split, which no step of training sees. The card records
the recipe and the numbers.

The default target is ``smollm2-135m-robot``, the model store's merge of ``train-target``'s
adapter; the default run takes about 25 minutes on 2 idle CPU cores (rollouts about 3.5 if
``train-target``'s are not cached, answers about 9, training 11, measuring 1).
"""

from __future__ import annotations

import functools
import json
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from speculative_vlm.decoding.model_store import ROBOT_TARGET
from speculative_vlm.evaluation.world import SIM_CONFIG
from speculative_vlm.training.target_data import DEFAULT_CACHE as ROLLOUT_CACHE
from speculative_vlm.training.target_data import DataRecipe

SHIPPED_DRAFT = Path(__file__).resolve().parents[2] / "models" / "command-draft"
DEFAULT_CACHE = Path.home() / ".cache" / "speculative_vlm" / "draft-data"


@dataclass(frozen=True)
class TrainDraftOptions:
    """One run's settings (``speculative-vlm train-draft`` sets each from its flag of the same name)."""

    target: str = ROBOT_TARGET  # target model folder or store name
    out: Path = SHIPPED_DRAFT  # where the draft, metrics.json and card.md go
    prompts: int = 1152  # robot-command training prompts
    general: int = 192  # general-instruction training prompts
    heldout: int = 64  # held-out command prompts, one per held-out episode (and half as many general)
    minutes: float = 11.0  # training time budget
    max_steps: int | None = None  # stop training after this many steps
    data_cache: Path = DEFAULT_CACHE  # cache of the target's answers
    layers: int = 4  # the draft's shape
    hidden: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0  # which rollout states are sampled, and the training order
    gamma: int = 4  # tokens per block when measuring acceptance
    gen_batch: int = 32  # prompts per batched generation (and cache shard)
    threads: int = 2  # torch CPU threads
    # The robot prompts: train-target's rollouts (its defaults) and the held-out episodes.
    config: Path = SIM_CONFIG  # bringup config whose motion limits and camera size the rollouts use
    progress_line: bool = True  # prompts carry the odometry progress line
    episodes: int = DataRecipe.episodes  # expert rollouts (train split)
    perturbed_episodes: int = DataRecipe.perturbed_episodes  # rollouts with some moves replaced by random ones
    perturb: float = DataRecipe.perturb  # chance a move is replaced in those
    data_seed: int = DataRecipe.seed  # episode seed of the rollouts
    split_seed: int = DataRecipe.split_seed  # which combinations are held out (as eval's)
    rollout_cache: Path = ROLLOUT_CACHE  # where rollouts are cached (train-target's --data-cache)
    eval_seed: int = 0  # episode seed of the held-out episodes


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def _report_dict(report) -> dict:
    return {**asdict(report), "acceptance": report.acceptance, "tokens_per_pass": report.tokens_per_pass}


def train_draft(options: TrainDraftOptions) -> int:
    """Collect, distil, save to ``options.out`` and measure (the module docstring); 2 when the target is missing."""
    import torch
    from transformers import AutoModelForCausalLM

    from speculative_vlm.decoding.model_store import ModelNotFound, resolve
    from speculative_vlm.evaluation.world import WorldConfig
    from speculative_vlm.training.acceptance import AcceptanceReport, measure
    from speculative_vlm.training.distill import TrainSettings, distil
    from speculative_vlm.training.draft_model import DraftShape, ProjectedDraft
    from speculative_vlm.training.teacher_data import DataSpec, TeacherData, heldout_prompts, training_prompts

    began = time.monotonic()
    torch.set_num_threads(options.threads)
    try:
        target_dir = resolve(options.target)
    except ModelNotFound as error:
        print(f"[train-draft] {error}", file=sys.stderr, flush=True)
        return 2
    log = functools.partial(print, flush=True)
    # The rollouts exactly as train-target makes them (its cache serves both when nothing changed).
    config = replace(WorldConfig.from_config(options.config), progress_line=True)
    recipe = DataRecipe(options.episodes, options.perturbed_episodes, options.perturb, options.data_seed, options.split_seed)
    log(f"[train-draft] prompts: held-out split episodes (seed {options.eval_seed}), train-split rollouts {recipe}; "
        f"progress line {'on' if options.progress_line else 'off'}")
    held_prompts = heldout_prompts(options.heldout, config, split_seed=options.split_seed, episode_seed=options.eval_seed,
                                   progress_line=options.progress_line)
    train_prompts, pool = training_prompts(options.prompts, recipe, config, options.rollout_cache,
                                           progress_line=options.progress_line, seed=options.seed,
                                           exclude={p.text for p in held_prompts}, log=log)
    log(f"[train-draft] {len(train_prompts)} training prompts sampled from {pool} distinct train-split states, "
        f"{len(held_prompts)} held-out prompts")

    log(f"[train-draft] target {target_dir}; answers cached under {options.data_cache}")
    teacher = TeacherData(target_dir, options.data_cache)
    heldout = teacher.collect(DataSpec(tuple(held_prompts), general=max(options.heldout // 2, 1), seed="heldout",
                                       batch_size=options.gen_batch), log)
    train = teacher.collect(DataSpec(tuple(train_prompts), general=options.general, seed="train",
                                     batch_size=options.gen_batch), log)
    data_minutes = (time.monotonic() - began) / 60

    shape = DraftShape(layers=options.layers, hidden=options.hidden, intermediate=3 * options.hidden,
                       heads=max(options.hidden // 64, 1), kv_heads=max(options.hidden // 64, 1))
    draft = ProjectedDraft(teacher.model.get_input_embeddings().weight, teacher.model.config, shape)
    target_config = teacher.model.config
    teacher.model = None  # the target is no longer needed; free its memory for training
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    log(f"[train-draft] draft {shape}, {trainable / 1e6:.2f}M trainable parameters; {len(train)} training answers")
    settings = TrainSettings(minutes=options.minutes, batch_size=options.batch_size, lr=options.lr, max_steps=options.max_steps,
                             seed=options.seed)
    report = distil(draft, train, pad_id=teacher.pad_id, settings=settings, log=log)

    out: Path = options.out
    out.mkdir(parents=True, exist_ok=True)
    llama = draft.materialise().to(torch.float16)
    llama.save_pretrained(out)
    teacher.tokenizer.save_pretrained(out)
    size_mb = _folder_mb(out)

    # Measure what ships: the saved folder, loaded the way the engine loads it.
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    commands = [e for e in heldout if e.kind == "command"]
    general = [e for e in heldout if e.kind == "general"]
    stops = frozenset(teacher.stop_ids)
    log(f"[train-draft] measuring acceptance on {len(commands)} held-out-split prompts at {options.gamma} tokens/block")
    families = {f: measure(shipped, [e for e in commands if e.family == f], options.gamma, teacher.compiled, stops)
                for f in sorted({e.family for e in commands})}
    cmd = AcceptanceReport.total(list(families.values()))
    forced = measure(shipped, commands, options.gamma, teacher.compiled, stops, force=True)
    gen = measure(shipped, general, options.gamma, None, stops)
    log(f"[train-draft] held-out commands: {cmd.line()}")
    for family, r in families.items():
        log(f"[train-draft]   {family:9s} acceptance {r.acceptance:.3f} over {r.prompts} prompts")
    log(f"[train-draft] held-out commands with grammar forcing: {forced.line()}")
    log(f"[train-draft] general: {gen.line()}")

    metrics = {
        "target": str(target_dir.name),
        "gamma": options.gamma,
        "commands": _report_dict(cmd),
        "commands_by_family": {f: _report_dict(r) for f, r in families.items()},
        "commands_forced": _report_dict(forced),
        "general": _report_dict(gen),
        "training": asdict(report),
        "shape": asdict(shape),
        "trainable_parameters": trainable,
        "data": {"command_prompts": len(train_prompts), "general_prompts": options.general,
                 "heldout_command": len(commands), "heldout_general": len(general),
                 "answer_tokens": sum(len(e.answer_ids) for e in train),
                 "progress_line": options.progress_line, "recipe": asdict(recipe), "distinct_train_states": pool,
                 "train_families": dict(sorted(Counter(p.family for p in train_prompts).items())),
                 "heldout_episodes": len({p.episode for p in held_prompts}), "eval_seed": options.eval_seed,
                 "minutes": round(data_minutes, 1)},
        "folder_mb": round(size_mb, 1),
        "total_minutes": round((time.monotonic() - began) / 60, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "card.md").write_text(_card(options, metrics, target_config, cmd.line(), forced.line(), gen.line()))
    log(f"[train-draft] wrote {out} ({size_mb:.1f} MB) in {metrics['total_minutes']} min")
    return 0


def _card(options: TrainDraftOptions, m: dict, target_config, cmd_line: str, forced_line: str, gen_line: str) -> str:
    t, d, s, r = m["training"], m["data"], m["shape"], m["data"]["recipe"]
    command = "speculative-vlm train-draft " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "speculative-vlm train-draft"
    progress = ("with the odometry progress line (`Progress: moved ...; last command: ...`), as the drafter "
                "sends it with `progress_line` on" if d["progress_line"] else "without the progress line")
    families = ", ".join(f"{k} {v}" for k, v in d["train_families"].items())
    rows = "\n".join(f"| {f} | {x['prompts']} | {x['acceptance']:.3f} | {x['tokens_per_pass']:.2f} |"
                     for f, x in m["commands_by_family"].items())
    return f"""# command-draft: a distilled draft for {m['target']}

A {s['layers']}-layer Llama (hidden {s['hidden']}, MLP {s['intermediate']}, {s['heads']} heads) on the
target's vocabulary ({target_config.vocab_size} tokens, same tokenizer, saved here). It loads with
`AutoModelForCausalLM.from_pretrained` on this folder; weights fp16, {m['folder_mb']} MB.

## Data recipe
- Robot-command prompts: {d['command_prompts']} sampled (seed {options.seed}) from the {d['distinct_train_states']} distinct
  states of the rollouts `train-target` learns from (`training.target_data.cached_examples`: the
  evaluation's *train* split only, {r['episodes']} expert rollouts and {r['perturbed_episodes']} with moves replaced at
  random with probability {r['perturb']}, episode seed {r['seed']}, split seed {r['split_seed']}): the requests the
  robot's drafter sends, the system prompt of `commands/prompts.py`, the instruction in the
  evaluation's train phrasings, the scene text described from the camera frame, {progress}.
  Families: {families}.
- Answers: the target's own greedy output under the engine's command grammar
  (`speculative_vlm.commands.grammar`, grammar "command"), with its top-32 log-probs
  after the grammar mask (self-distillation: the target's answers, not the expert's commands);
  {d['answer_tokens']} answer tokens in all (commands and general).
- General instructions: {d['general_prompts']} template questions (`training/general_prompts.py`),
  answered by the target unconstrained (at most 48 tokens), meant to keep the draft
  usable outside the command domain (the general acceptance below says how far it gets).
- Held out: {d['heldout_command']} command prompts, one step of each of {d['heldout_episodes']} expert rollouts of the
  evaluation's *held-out* split (`evaluation/splits.py`; eval's episodes of seed {d['eval_seed']}: colour/shape
  combinations, layouts and phrasings no training prompt has), prompted the same way; and
  {d['heldout_general']} general prompts from another seed.

## Training
- Tied embedding = the target's embedding x a learnt {target_config.hidden_size}->{s['hidden']} projection
  (initialised with its principal directions), folded into a plain embedding before saving.
  {m['trainable_parameters'] / 1e6:.2f}M trainable parameters.
- Loss per answer token: cross-entropy to the target's top-32 distribution + 0.5 x
  cross-entropy to the target's token. AdamW, lr {options.lr}, cosine over the time budget,
  batch {options.batch_size}.
- {t['steps']} steps ({t['examples_seen']} examples) in {t['minutes']:.1f} min on {options.threads} CPU thread(s)
  ({platform.processor() or platform.machine()}); rollouts and answers {d['minutes']} min; whole run
  {m['total_minutes']} min.

## Acceptance against the target (held-out split, greedy, lossless verification)
- Robot commands, draft masked by the same grammar, every token drafted: {cmd_line}.
- The same with grammar forcing (tokens the grammar allows alone are appended without a
  draft or a target pass, as the engine does): {forced_line}.
- General instructions, unconstrained: {gen_line}.

| held-out family | prompts | acceptance at {m['gamma']} tokens/block | tokens per target pass |
|---|---|---|---|
{rows}

Replayed with `speculative_vlm.training.acceptance.measure` on the saved folder: the
target's greedy answer is known, so a round accepts the longest drafted prefix equal to it
plus the target's next token, exactly as lossless greedy verification would.

## Reproduce
`{command}` (rollouts are reused from `--rollout-cache`, answers from `--data-cache`, when present).
"""
