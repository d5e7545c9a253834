"""`speculative-vlm train-target`: fine-tune the target on the scripted expert's commands (a LoRA delta
with a card), or with ``--vision`` the VLM target (``training/train_target.py``, ``training/train_vlm.py``).

Options left unset take the mode's default (``training/train_vlm.MODE_DEFAULTS``), so ``--vision``
changes the epochs, the rank and the time cap unless they are given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speculative_vlm.decoding.model_store import SMOLLM2, VLM_TARGET
from speculative_vlm.training.train_target import SHIPPED_ADAPTER, TrainTargetOptions
from speculative_vlm.training.train_target import run as train_target
from speculative_vlm.training.train_vlm import MODE_DEFAULTS, SHIPPED_DELTA

D = TrainTargetOptions  # the defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=D.target, help="base model folder or store name")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the adapter, card.md, train-log.txt and metrics.json go (replaced whole); "
                             f"default {SHIPPED_ADAPTER} (--vision: {SHIPPED_DELTA})")
    data = parser.add_argument_group("data (train split only)")
    data.add_argument("--episodes", type=int, default=D.episodes, help="expert rollouts")
    data.add_argument("--perturbed-episodes", type=int, default=D.perturbed_episodes,
                      help="rollouts with some expert moves replaced by random ones (recovery states)")
    data.add_argument("--perturb", type=float, default=D.perturb, help="chance a move is replaced in those")
    data.add_argument("--data-seed", type=int, default=D.data_seed,
                      help="episode seed of the training rollouts (eval's train-like episodes use seed 0)")
    data.add_argument("--reword", type=float, default=D.reword,
                      help="share of the steps trained with a fresh train-split wording of their instruction "
                           "(training/augment.py)")
    data.add_argument("--restyle", type=float, default=D.restyle,
                      help="share of those fresh wordings also restyled (train-only surface changes)")
    data.add_argument("--split-seed", type=int, default=D.split_seed, help="which combinations are held out (as eval's)")
    data.add_argument("--data-cache", type=Path, default=D.data_cache,
                      help="where rollouts are cached; an identical later run reuses them")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=None, help=_modal("passes over the examples", "epochs"))
    train.add_argument("--batch-size", type=int, default=D.batch_size)
    train.add_argument("--lr", type=float, default=None, help=_modal("peak learning rate", "lr"))
    train.add_argument("--warmup-steps", type=int, default=None, help=_modal("warm-up steps", "warmup_steps"))
    train.add_argument("--rank", type=int, default=None, help=_modal("LoRA rank (--vision: 0 freezes the backbone)",
                                                                     "rank"))
    train.add_argument("--alpha", type=int, default=None, help=_modal("LoRA alpha", "alpha"))
    train.add_argument("--dropout", type=float, default=D.dropout, help="LoRA dropout")
    train.add_argument("--autocast", default=D.autocast, choices=("bfloat16", "float16", "none"),
                       help="mixed precision of the forward pass, float32 weights and optimiser ('none': float32 "
                            "throughout)")
    train.add_argument("--minutes", type=float, default=None,
                       help=_modal("hard cap on the training time; the schedule is by step, so a capped run is "
                                   "shorter, not different", "minutes"))
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (pilots, tests)")
    train.add_argument("--seed", type=int, default=D.seed, help="torch seed and data order")
    train.add_argument("--threads", type=int, default=D.threads,
                       help="torch CPU threads (1 when other work holds a core of two: seen here, two threads then "
                            "waited on each other and ran several times slower than one)")
    measure = parser.add_argument_group("measurement (held-out split only)")
    measure.add_argument("--single-step", type=int, default=D.single_step,
                         help="held-out prompts for single-step direction correctness (eval's first N)")
    measure.add_argument("--eval-episodes", type=int, default=D.eval_episodes, help="held-out closed-loop episodes per model")
    measure.add_argument("--eval-max-steps", type=int, default=D.eval_max_steps,
                         help="cap the closed-loop episodes' step limits (0: each family's own)")
    measure.add_argument("--eval-seed", type=int, default=D.eval_seed, help="episode seed of the held-out measurement")
    measure.add_argument("--probe", type=int, default=None,
                         help=_modal("held-out prompts scored during training (monitoring only; 0: none)", "probe"))
    measure.add_argument("--probe-every", type=int, default=None, help=_modal("steps between probes", "probe_every"))
    measure.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=D.baseline,
                         help="also measure the stock model (--vision: the text target, reading scene text)")
    measure.add_argument("--config", type=Path, default=D.config,
                         help="bringup config whose motion limits and camera size apply")
    _add_vision_arguments(parser)


def _modal(text: str, name: str) -> str:
    """Help naming an option's two defaults (MODE_DEFAULTS)."""
    plain, vision = MODE_DEFAULTS[name]
    return f"{text}; default {plain} (--vision: {vision})"


def _add_vision_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``train-target --vision`` (the rest are train-target's own)."""
    parser.add_argument("--vision", action="store_true",
                        help="train the VLM target (vision tower + connector + LoRA on --backbone) from rendered "
                             "camera frames; ships speculative_vlm/models/command-target-vlm (merged as "
                             f"{VLM_TARGET})")
    g = parser.add_argument_group("vision (with --vision)")
    g.add_argument("--backbone", default=D.backbone,
                   help=f"the text model the VLM starts from: the text target (default) or {SMOLLM2} "
                        "(tests, development); a folder or a store name")
    g.add_argument("--image-size", type=int, default=D.image_size, help="px, square")
    g.add_argument("--patch-size", type=int, default=D.patch_size)
    g.add_argument("--vision-layers", type=int, default=D.vision_layers)
    g.add_argument("--vision-hidden", type=int, default=D.vision_hidden)
    g.add_argument("--vision-heads", type=int, default=D.vision_heads)
    g.add_argument("--scale-factor", type=int, default=D.scale_factor,
                   help="pixel shuffle; image tokens = (image/patch)^2 / scale^2")
    g.add_argument("--plain-frames", type=float, default=D.plain_frames,
                   help="share of frames rendered exactly as the simulator does (the rest vary)")
    g.add_argument("--caption", type=float, default=D.caption,
                   help="share of the rows that ask instead for the frame's description, answered with the scene "
                        "describer's words for that rendered frame (dense supervision for the vision tower)")
    g.add_argument("--vision-pretrain-steps", type=int, default=D.vision_pretrain_steps,
                   help="stage 1: steps of 16 frames in which the vision tower and connector learn each image "
                        "token's region (colour and shape of the object there, from the describer's blobs) before "
                        "the language model reads them (training/vision_pretrain.py); 0 skips it")


def run(args: argparse.Namespace) -> int:
    options = vars(args)
    options["autocast"] = None if options["autocast"] == "none" else options["autocast"]
    return train_target(TrainTargetOptions(**options))
