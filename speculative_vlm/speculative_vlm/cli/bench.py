"""`speculative-vlm bench`: every method side by side; writes the report, CSVs and plots
(``benchmark/run.py``); exit status 1 when a lossless method's output differs from the target's.

    speculative-vlm bench            # full: SmolLM2 target + the shipped draft (~20 min on 2 cores)
    speculative-vlm bench --quick    # tiny random models, seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speculative_vlm.benchmark.run import (
    DEFAULT_DRAFT,
    DEFAULT_OUT,
    STAND_IN_DRAFT,
    BenchOptions,
    run_bench,
)

D = BenchOptions  # the defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny random models and few prompts (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {DEFAULT_OUT}; --quick: a temporary folder)")
    parser.add_argument("--target", default=D.target,
                        help="target model folder or store name (default: the sim config's cloud_server model)")
    parser.add_argument("--draft", default=None,
                        help=f"draft model folder (default {DEFAULT_DRAFT} when it holds a model, "
                             f"else {STAND_IN_DRAFT} in bfloat16 as a stand-in)")
    parser.add_argument("--draft-dtype", default=None, help="load the draft in this dtype (e.g. bfloat16)")
    parser.add_argument("--perception", choices=("scene_text", "image"), default=None,
                        help="what the target reads of each frame: scene text, or the JPEG (a VLM target; the "
                             "text draft then reads the scene text); default: the sim config's drafter's")
    parser.add_argument("--exit-layers", default=None,
                        help="target layers with early exits (default: one, the earliest trained layer, or 3/4 "
                             "depth without trained heads)")
    parser.add_argument("--exit-heads", default=None,
                        help="trained exit adapters (a train-exits checkpoint; default: the sim config's cloud_server "
                             "exit_heads when the target is its model, else the untrained shared head)")
    parser.add_argument("--early-threshold", type=float, default=D.early_threshold,
                        help="exit confidence needed to draft preemptively")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per method and RTT (full: 10)")
    parser.add_argument("--free-prompts", type=int, default=None, help="prompts for the grammar-off rung (full: 3)")
    parser.add_argument("--rtts", default=D.rtts, help="RTT profiles in ms")
    parser.add_argument("--methods", default=D.methods,
                        help="the ladder's rungs to decode at every RTT (a quick look at a few; the report's "
                             "checks of rungs left out read 'not measured')")
    parser.add_argument("--bandwidth-mbps", type=float, default=D.bandwidth_mbps, help="link bandwidth limit each way")
    parser.add_argument("--jitter-ms", type=float, default=D.jitter_ms, help="one-way jitter (std dev)")
    parser.add_argument("--gamma", type=int, default=D.gamma, help="draft tokens per block (initial, when adaptive)")
    parser.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens)
    parser.add_argument("--fleet", default=D.fleet, help="robot counts for the fleet")
    parser.add_argument("--fleet-commands", type=int, default=None, help="commands per fleet robot (full: 3)")
    parser.add_argument("--fleet-rtt", type=float, default=D.fleet_rtt, help="RTT of the fleet's link, ms")
    parser.add_argument("--fleet-max-wait-ms", type=float, default=D.fleet_max_wait_ms,
                        help="batching wait of the batched server")
    parser.add_argument("--fleet-replicas", default=None, help="verifier replica counts on Ray Serve for the largest "
                        "fleet (full: 1,2; quick: none; '' = none)")
    parser.add_argument("--ros-rtt", type=float, default=D.ros_rtt, help="RTT of the ROS-hop line, ms")
    parser.add_argument("--no-ros", action="store_true", help="skip the ROS-hop line")
    parser.add_argument("--robot-core", type=int, default=D.robot_core, help="CPU core of the robot side")
    parser.add_argument("--cloud-core", type=int, default=D.cloud_core, help="CPU core of the cloud side")
    parser.add_argument("--inprocess-threads", type=int, default=D.inprocess_threads,
                        help="torch threads of the one-process run")


def run(args: argparse.Namespace) -> int:
    return run_bench(BenchOptions(**vars(args)))
