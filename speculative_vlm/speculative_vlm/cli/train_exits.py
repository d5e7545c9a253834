"""`speculative-vlm train-exits`: train the target's early-exit adapters by self-distillation on the
robot's prompts (``training/train_exits.py`` says how) and write a checkpoint for ``--exit-heads``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from speculative_vlm.decoding.exits import save_exit_heads
from speculative_vlm.evaluation.world import SIM_CONFIG
from speculative_vlm.training.train_exits import DEFAULT_LAYERS, RobotRequests, config_target, train_exits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=SIM_CONFIG,
                        help="bringup config: its drafter section says how the robot asks (system prompt, progress "
                             "line, grammar, token limit), its cloud_server model is the default target")
    parser.add_argument("--target", default=None,
                        help="target model folder or model-store name (default: the config's cloud_server model)")
    parser.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS), help="exit layers to train")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (for --exit-heads)")
    parser.add_argument("--train-prompts", type=int, default=48, help="training prompts (one per train-split rollout)")
    parser.add_argument("--validation-prompts", type=int, default=12,
                        help="prompts from other train-split rollouts on which agreement is measured")
    parser.add_argument("--progress-line", action=argparse.BooleanOptionalAction, default=None,
                        help="prompts carry the progress line (default: the config drafter's progress_line; a "
                             "target trained by train-target reads it)")
    parser.add_argument("--seed", type=int, default=2, help="episode seed of the rollouts")
    parser.add_argument("--split-seed", type=int, default=0, help="which combinations are held out (as eval's)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--inner", type=int, default=256, help="adapter width")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from speculative_vlm.decoding.models import load_model

    torch.set_num_threads(args.threads)
    overrides = {} if args.progress_line is None else {"progress_line": args.progress_line}
    robot = RobotRequests.from_config(args.config, seed=args.seed, split_seed=args.split_seed, **overrides)
    target_name = args.target or config_target(args.config)
    target = load_model(target_name)
    log = (lambda *_: None) if args.json else (lambda s: print(s, flush=True))
    log(f"[train-exits] target {target_name}; prompts as the drafter of {args.config} sends them "
        f"(progress line {'on' if robot.progress_line else 'off'}, grammar {robot.settings.grammar!r})")
    heads, report = train_exits(
        target,
        args.layers,
        train_prompts=args.train_prompts,
        validation_prompts=args.validation_prompts,
        steps=args.steps,
        lr=args.lr,
        inner=args.inner,
        robot=robot,
        log=log,
    )
    path = save_exit_heads(heads, args.out, target, report)
    report["checkpoint"] = str(path)
    if args.json:
        print(json.dumps(report))
    else:
        print("layer  agreement before -> after (validation answer positions)")
        for layer in report["layers"]:
            print(f"{layer:5d}  {report['agreement_before'][str(layer)]:.3f} -> {report['agreement_after'][str(layer)]:.3f}")
        print(f"checkpoint: {path}")
    return 0
