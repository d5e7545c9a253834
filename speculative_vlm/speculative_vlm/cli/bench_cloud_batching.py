"""`speculative-vlm bench-cloud-batching`: tokens per second of N robots on one verifier, batched
against unbatched (``benchmark/cloud_batching.py``); exit status 1 when an output differs from the
target's own.

    speculative-vlm bench-cloud-batching --model smollm2-135m-instruct --clients 4
"""

from __future__ import annotations

import argparse
import dataclasses

from speculative_vlm.benchmark.cloud_batching import BatchingOptions, run_batching

D = BatchingOptions  # the defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=D.model, help="target folder or model-store name")
    parser.add_argument("--exit-layers", default="", help="comma-separated exit layers (early verdicts)")
    parser.add_argument("--clients", type=int, default=D.clients)
    parser.add_argument("--max-batch", type=int, default=D.max_batch,
                        help="batched phase's max batch (0 = clients)")
    parser.add_argument("--max-wait-ms", type=float, default=D.max_wait_ms,
                        help="batched phase's longest added wait")
    parser.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens)
    parser.add_argument("--gamma", type=int, default=D.gamma, help="draft tokens per block")
    parser.add_argument("--acceptance", type=float, default=D.acceptance,
                        help="per-token chance a draft token is right")
    parser.add_argument("--draft-ms-per-token", type=float, default=D.draft_ms_per_token,
                        help="emulated robot drafting time")
    parser.add_argument("--delay-ms", type=float, default=D.delay_ms,
                        help="one-way link delay through the netem proxy")
    parser.add_argument("--jitter-ms", type=float, default=D.jitter_ms)
    parser.add_argument("--repeats", type=int, default=D.repeats,
                        help="alternating batched/unbatched runs (median)")
    parser.add_argument("--threads", type=int, default=D.threads, help="torch threads (0 = leave as is)")
    parser.add_argument("--replicas", type=int, default=D.replicas, help="also 1 against this many verifier "
                        "replicas on Ray Serve behind one address (cloud/ray_serve.py; 0 = skip)")
    parser.add_argument("--json", dest="json_path", metavar="JSON", help="also write the results here")


def run(args: argparse.Namespace) -> int:
    layers = tuple(int(x) for x in args.exit_layers.split(",") if x.strip())
    return run_batching(dataclasses.replace(BatchingOptions(**vars(args)), exit_layers=layers))
