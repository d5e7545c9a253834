"""`speculative-vlm train-draft`: distil a small draft from the target's own answers to the robot's
prompts, measure it on the held-out split and write it with a card (``training/train_draft.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from speculative_vlm.training.train_draft import TrainDraftOptions, train_draft

D = TrainDraftOptions  # the defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=D.target, help="target model folder or store name")
    parser.add_argument("--out", type=Path, default=D.out, help="where to write the draft and card.md")
    parser.add_argument("--prompts", type=int, default=D.prompts, help="robot-command training prompts")
    parser.add_argument("--general", type=int, default=D.general, help="general-instruction training prompts")
    parser.add_argument("--heldout", type=int, default=D.heldout,
                        help="held-out command prompts, one per held-out episode (and half as many general)")
    parser.add_argument("--minutes", type=float, default=D.minutes, help="training time budget in minutes")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps")
    parser.add_argument("--data-cache", type=Path, default=D.data_cache, help="cache of the target's answers")
    parser.add_argument("--layers", type=int, default=D.layers)
    parser.add_argument("--hidden", type=int, default=D.hidden)
    parser.add_argument("--batch-size", type=int, default=D.batch_size)
    parser.add_argument("--lr", type=float, default=D.lr)
    parser.add_argument("--seed", type=int, default=D.seed, help="which rollout states are sampled, and the training order")
    parser.add_argument("--gamma", type=int, default=D.gamma, help="tokens per block when measuring acceptance")
    parser.add_argument("--gen-batch", type=int, default=D.gen_batch, help="prompts per batched generation (and cache shard)")
    parser.add_argument("--threads", type=int, default=D.threads, help="torch CPU threads")
    prompts = parser.add_argument_group("robot prompts (train-target's rollouts; the defaults are its own)")
    prompts.add_argument("--config", type=Path, default=D.config,
                         help="bringup config whose motion limits and camera size the rollouts use")
    prompts.add_argument("--progress-line", action=argparse.BooleanOptionalAction, default=D.progress_line,
                         help="prompts carry the odometry progress line, as the drafter sends it to a target "
                              "trained by train-target")
    prompts.add_argument("--episodes", type=int, default=D.episodes, help="expert rollouts (train split)")
    prompts.add_argument("--perturbed-episodes", type=int, default=D.perturbed_episodes,
                         help="rollouts with some expert moves replaced by random ones")
    prompts.add_argument("--perturb", type=float, default=D.perturb, help="chance a move is replaced in those")
    prompts.add_argument("--data-seed", type=int, default=D.data_seed, help="episode seed of the rollouts")
    prompts.add_argument("--split-seed", type=int, default=D.split_seed,
                         help="which combinations are held out (as eval's)")
    prompts.add_argument("--rollout-cache", type=Path, default=D.rollout_cache,
                         help="where rollouts are cached (train-target's --data-cache)")
    prompts.add_argument("--eval-seed", type=int, default=D.eval_seed, help="episode seed of the held-out episodes")


def run(args: argparse.Namespace) -> int:
    return train_draft(TrainDraftOptions(**vars(args)))
