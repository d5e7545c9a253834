"""`speculative-vlm eval`: closed-loop episodes in the simulated Go2; writes the report, CSVs and plots
(``evaluation/run.py``, whose docstring says what a policy spec is).

    speculative-vlm eval                      # expert + stock SmolLM2 (with the shipped draft), both splits
    speculative-vlm eval --policy expert --policy my-target+command-draft --episodes 110
    speculative-vlm eval --quick              # tiny random models, one episode per family; the test suite runs it
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speculative_vlm.evaluation.episodes import FAMILIES
from speculative_vlm.evaluation.phrasings import HELDOUT, TRAIN
from speculative_vlm.evaluation.run import (
    DEFAULT_OUT,
    DEFAULT_POLICIES,
    QUICK_MODEL_STEPS,
    EvalOptions,
    run_evaluation,
)

D = EvalOptions  # the defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", action="append", default=None,
                        help="'expert', 'TARGET', 'TARGET+DRAFT', 'image:TARGET[+DRAFT]' (a VLM target sees the frame) "
                             "or 'image~N:TARGET[+DRAFT]' (frames with N grey levels of extra noise), with '@N' to run only the "
                             "first N episodes of each split (a slow baseline); repeat to compare "
                             f"(default: {' and '.join(DEFAULT_POLICIES)}; --quick: expert and tiny random models)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny random models (at most {QUICK_MODEL_STEPS} steps an episode), one episode per "
                             "family and split (CI)")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per split (default 66; --quick 11)")
    parser.add_argument("--train-episodes", type=int, default=None,
                        help="episodes of the train-like split (default: as --episodes; the held-out split is "
                             "the one the targets are judged on)")
    parser.add_argument("--split", choices=("both", TRAIN, HELDOUT), default=D.split, help="which split(s) to run")
    parser.add_argument("--families", default=D.families, help=f"comma-separated families (default all: "
                                                               f"{','.join(f.value for f in FAMILIES)})")
    parser.add_argument("--seed", type=int, default=D.seed, help="episode seed")
    parser.add_argument("--split-seed", type=int, default=D.split_seed,
                        help="which colour/shape combinations are held out")
    parser.add_argument("--single-step", type=int, default=None,
                        help="held-out prompts for single-step direction correctness per model policy "
                             "(default 100; --quick 4; 0 = skip)")
    parser.add_argument("--max-steps", type=int, default=D.max_steps,
                        help="cap every episode's step limit (0: the family's)")
    parser.add_argument("--graph", type=int, default=D.graph, help="also run N held-out episodes through the ROS graph")
    parser.add_argument("--config", type=Path, default=D.config,
                        help="bringup config whose motion limits and camera size apply (default config/sim.yaml)")
    parser.add_argument("--progress-line", choices=("config", "on", "off"), default=D.progress_line,
                        help="tell the models their odometry each step, as the drafter's progress_line does "
                             "(default: the config's drafter section)")
    parser.add_argument("--draft-length", type=int, default=D.draft_length, help="draft tokens per block")
    parser.add_argument("--threads", type=int, default=D.threads, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {DEFAULT_OUT}; --quick: a temporary folder)")


def run(args: argparse.Namespace) -> int:
    return run_evaluation(EvalOptions(**vars(args)))
