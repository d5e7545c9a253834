"""The `speculative-vlm` command: one entry point, subcommands imported on demand.

Every subcommand's command line lives in this package, one module a subcommand
(``speculative-vlm bench-cloud-batching`` is ``cli/bench_cloud_batching.py``), holding
``add_arguments(parser)`` and ``run(args) -> int``; ``run`` turns the arguments into calls of
library functions, which take no ``argparse`` objects. The standalone executables (the nodes,
``speculative-vlm-sim-go2``, ``speculative-vlm-cloud``) keep their ``main`` in their own module,
as ROS 2 packages do (``console_scripts`` ``module:main``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("speculative_vlm.cli.up", "start the node graph of a YAML config in one process"),
    "prepare-models": ("speculative_vlm.cli.prepare_models", "convert the SmolLM2 GGUF, merge shipped adapters (once)"),
    "generate": ("speculative_vlm.cli.generate", "speculative decoding of one prompt, in one process"),
    "train-exits": ("speculative_vlm.cli.train_exits", "self-distil early-exit adapters on the robot's prompts"),
    "train-draft": ("speculative_vlm.cli.train_draft", "distil a small draft from the target's own answers"),
    "train-target": ("speculative_vlm.cli.train_target", "fine-tune the target (LoRA) on the expert's commands"),
    "record": ("speculative_vlm.cli.record", "record topics into a rosbag2 MCAP bag"),
    "replay": ("speculative_vlm.cli.replay", "play a rosbag2 bag with /clock"),
    "gen-protocol": ("speculative_vlm.cli.gen_protocol", "regenerate the cloud protocol stubs from the .proto"),
    "cloud-certs": ("speculative_vlm.cli.cloud_certs", "a CA and a server TLS pair signed by it; --client NAME: a client pair (mTLS)"),
    "netem": ("speculative_vlm.cli.netem", "run a loopback proxy adding delay, jitter, bandwidth limit"),
    "bench-cloud-batching": ("speculative_vlm.cli.bench_cloud_batching", "tokens/s of N robots, batched vs unbatched"),
    "bench": ("speculative_vlm.cli.bench", "every method side by side; writes bench/results (--quick: seconds)"),
    "eval": ("speculative_vlm.cli.eval", "closed-loop episodes in the simulated Go2; writes eval/results"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speculative-vlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # Only the chosen subcommand's module is imported, so `--help` stays fast.
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        sp = argparse.ArgumentParser(prog=f"speculative-vlm {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
        module.add_arguments(sp)
        return int(module.run(sp.parse_args(argv[1:])) or 0)
    parser.parse_args(argv)
    return 2

