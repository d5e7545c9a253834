"""`speculative-vlm prepare-models`: convert the SmolLM2 GGUF and merge the shipped adapters, once
(scripts/setup runs it; ``decoding/model_store.py`` does the work)."""

from __future__ import annotations

import argparse

from speculative_vlm.decoding.model_store import MERGED_MODELS, prepare_merged, prepare_smollm2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="convert and merge again even if present")


def run(args: argparse.Namespace) -> int:
    print(prepare_smollm2(force=args.force))
    for name, adapter in MERGED_MODELS.items():
        merged = prepare_merged(name, force=args.force)
        print(merged if merged is not None else f"{name}: skipped, adapter {adapter!r} is not shipped yet")
    return 0
