"""`speculative-vlm generate`: try speculative decoding on a prompt, in one process.

Prints the verified text as it grows and a per-round summary; ``--check`` also runs the
target alone and says whether the outputs are identical; ``--json`` prints one JSON
object instead (text, token ids, rounds, acceptance, timings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from speculative_vlm.decoding.verifier import EARLY_THRESHOLD, GenerationSettings, SessionRequest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the instruction, e.g. 'walk to the red ball'")
    parser.add_argument("--target", required=True, help="target model folder or model-store name")
    parser.add_argument("--draft", required=True, help="draft model folder or model-store name")
    parser.add_argument("--draft-dtype", default=None, help="load the draft in this dtype (e.g. bfloat16)")
    parser.add_argument("--image", type=Path, default=None, help="JPEG/PNG for a vision-language target")
    parser.add_argument("--system", default="", help="system message")
    parser.add_argument("--grammar", default="", choices=["", "command"], help="constrain output to a grammar")
    parser.add_argument("--exit-layers", type=int, nargs="*", default=[], help="target layers with early exits")
    parser.add_argument("--exit-heads", type=Path, default=None, help="trained exit checkpoint (train-exits)")
    parser.add_argument("--draft-length", default="4", help="tokens per block, or 'adaptive'")
    parser.add_argument("--early-threshold", type=float, default=EARLY_THRESHOLD, help="confidence needed to preempt")
    parser.add_argument("--no-preempt", action="store_true", help="never draft before the final verdict")
    parser.add_argument("--no-pipeline", action="store_true", help="preempt, but submit after the final verdict")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--draft-only", action="store_true", help="run the draft alone (unverified)")
    parser.add_argument("--check", action="store_true", help="also run the target alone and compare")
    parser.add_argument("--json", action="store_true", help="print a JSON result")


def run(args: argparse.Namespace) -> int:
    import torch

    from speculative_vlm.decoding.inprocess import InProcessVerifier
    from speculative_vlm.decoding.loop import SpeculativeDecoder
    from speculative_vlm.decoding.models import load_model
    from speculative_vlm.decoding.policy import AdaptiveLength, FixedLength
    from speculative_vlm.decoding.target_engine import TargetEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_model(args.target)
    draft = load_model(args.draft, dtype=args.draft_dtype)
    settings = GenerationSettings(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        grammar=args.grammar,
        seed=args.seed,
    )
    image = args.image.read_bytes() if args.image else None
    request = SessionRequest(args.prompt, system=args.system, image=image, settings=settings)
    policy = AdaptiveLength() if args.draft_length == "adaptive" else FixedLength(int(args.draft_length))
    engine = TargetEngine(target, exit_layers=args.exit_layers, exit_heads=args.exit_heads)
    printed = [0]

    def stream(text: str) -> None:
        if not args.json:
            sys.stdout.write(text[printed[0] :])
            sys.stdout.flush()
            printed[0] = len(text)

    with InProcessVerifier(engine) as verifier:
        decoder = SpeculativeDecoder(
            draft,
            verifier,
            policy=policy,
            preempt=not args.no_preempt,
            pipeline=not args.no_pipeline,
            early_threshold=args.early_threshold,
        )
        if args.draft_only:
            result = decoder.generate_unverified(request, on_text=stream)
        else:
            result = decoder.generate(request, on_text=stream)
    summary = result.summary()
    if args.check:
        sess = engine.open_session(request)
        start = time.perf_counter()
        alone = list(engine.generate(sess))
        alone_s = time.perf_counter() - start
        engine.close_session(sess)
        summary["check"] = {
            "identical": alone == result.token_ids,
            "target_alone_tokens": len(alone),
            "target_alone_s": round(alone_s, 4),
            "target_alone_tokens_per_s": round(len(alone) / alone_s, 2) if alone_s else 0.0,
            "speedup": round(alone_s / result.wall_s, 3) if result.wall_s else 0.0,
        }
    if args.json:
        print(json.dumps(summary))
    else:
        print()
        print(_table(summary))
    if args.check and not summary["check"]["identical"]:
        return 1
    return 0


def _table(s: dict) -> str:
    lines = ["round drafted accepted +tokens early      layer  draft_ms wait_ms verify_ms"]
    for r in s["per_round"]:
        lines.append(
            f"{r['round']:5d} {r['drafted']:7d} {r['accepted']:8d} {r['committed']:7d} "
            f"{r['early']:10s} {r['early_layer']:5d} {r['draft_s'] * 1e3:8.1f} {r['wait_s'] * 1e3:7.1f} "
            f"{r['verify_s'] * 1e3:9.1f}"
        )
    lines.append(
        f"{s['tokens']} tokens in {s['wall_s']:.2f} s ({s['tokens_per_s']} tok/s), {s['rounds']} target passes, "
        f"acceptance {s['acceptance']:.3f}, {s['tokens_per_target_pass']:.2f} tokens/pass, "
        f"early hits {s['early_hits']} misses {s['early_misses']}" + ("" if s["verified"] else " [UNVERIFIED]")
    )
    if "check" in s:
        c = s["check"]
        lines.append(
            f"check: target alone {c['target_alone_tokens']} tokens in {c['target_alone_s']:.2f} s; "
            f"identical={c['identical']} speedup={c['speedup']}x"
        )
    return "\n".join(lines)
