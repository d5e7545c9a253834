"""`speculative-vlm gen-protocol`: regenerate the committed gRPC stubs from ``verifier.proto``
(``protocol/codegen.py``); ``--check`` only reports stale ones."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from speculative_vlm.protocol.codegen import generate, protocol_dir, stale_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="only report stale stubs (exit 1 if any)")


def run(args: argparse.Namespace) -> int:
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}")
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in generate(Path(tmp)).items():
            (protocol_dir() / name).write_bytes(data)
            print(f"wrote {protocol_dir() / name}")
    return 0
