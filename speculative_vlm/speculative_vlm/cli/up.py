"""`speculative-vlm up CONFIG`: start the node graph a YAML config names, in one process (``bringup``)."""

from __future__ import annotations

import argparse

from speculative_vlm.bringup import load_config, run_bringup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (e.g. speculative_vlm/config/sim.yaml)")
    parser.add_argument("--instruction", help="override the config's instruction ('' = serve only)")
    parser.add_argument("--max-steps", type=int, help="override the config's step limit")
    parser.add_argument("--plot", help="top-down PNG of the run (default: a new file under "
                        "$SPECULATIVE_VLM_RUNS or ~/.cache/speculative_vlm/runs; '' = none)")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.instruction is not None:
        config.instruction = args.instruction
    if args.max_steps is not None:
        config.max_steps = args.max_steps
    config.plot = args.plot
    return run_bringup(config)
