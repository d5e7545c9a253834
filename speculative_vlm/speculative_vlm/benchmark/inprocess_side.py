"""Worker: the one-process comparison (no network), which also fixes the reference outputs.

Target alone and speculative decoding run in one process on the same cores. The target
alone's greedy output *is* the reference every other method must reproduce: with the
command grammar for every prompt, and without it for the first ``free_prompts`` (the free-text
rung). For each reference it also records which positions the grammar forces, so the fleet's
replay robots can append them as a real drafter does.

    python -m speculative_vlm.benchmark.inprocess_side JOB.json   (started by `speculative-vlm bench`)
"""

from __future__ import annotations

import time

from speculative_vlm.benchmark import ladder
from speculative_vlm.benchmark.processes import pin, progress, read_job, write_result
from speculative_vlm.benchmark.workload import BenchPrompt


def forced_positions(model, request, reference: list[int]) -> list[bool]:
    """Which tokens of ``reference`` the request's grammar forces (the only token allowed there)."""
    from speculative_vlm.decoding.target_engine import make_tracker

    tracker = make_tracker(model, request)
    flags = []
    for token in reference:
        flags.append(tracker.grammar is not None and not tracker.done and tracker.grammar.forced_token() is not None)
        tracker.extend([token])
    return flags


def target_alone(engine, request) -> tuple[list[int], float, float]:
    """The target's own output, the seconds it took, and the seconds of the prefill."""
    start = time.perf_counter()
    session = engine.open_session(request)
    opened = time.perf_counter() - start
    try:
        tokens = list(engine.generate(session))
    finally:
        engine.close_session(session)
    return tokens, time.perf_counter() - start, opened


def main() -> int:
    job = read_job()
    pin(job["cores"], job["threads"])
    from speculative_vlm.decoding.inprocess import InProcessVerifier
    from speculative_vlm.decoding.models import load_model
    from speculative_vlm.decoding.target_engine import TargetEngine

    target = load_model(job["target"])
    draft = load_model(job["draft"], dtype=job.get("draft_dtype"))
    engine = TargetEngine(target, exit_layers=[], max_batch=1)
    settings = ladder.Settings(gamma=job["gamma"], early_threshold=job["early_threshold"])
    prompts = [BenchPrompt.from_json(p) for p in job["prompts"]]
    max_new = job["max_new_tokens"]
    rows: list[dict] = []
    references: dict[str, dict] = {}
    with InProcessVerifier(engine) as inner:
        verifier = ladder.OpenTimer(inner)
        # Warm-up (not recorded): first passes allocate caches and pick kernels.
        warm = prompts[0].request(True, 8)
        target_alone(engine, warm)
        ladder.decoder_for(ladder.VANILLA, draft, verifier, settings).generate(warm)
        for n, prompt in enumerate(prompts):
            ref: dict = {}
            for grammar in ([True, False] if n < job["free_prompts"] else [True]):
                request = prompt.request(grammar, max_new)
                tokens, wall, opened = target_alone(engine, request)
                key = "command" if grammar else "free"
                ref[key] = tokens
                ref[key + "_forced"] = forced_positions(target, request, tokens)
                ref[key + "_text"] = target.decode(tokens)
                if not grammar:
                    continue
                free = sum(not f for f in ref["command_forced"])
                rows.append({"method": "target_alone", "wall_s": wall, "open_s": opened, "tokens": len(tokens),
                             "passes": free, "exact": True, "first_divergence": -1, "text": ref["command_text"],
                             "prompt": prompt.index, "prompt_tokens": len(target.encode(request).ids)})
                for method in (ladder.VANILLA, ladder.ADAPTIVE_INPROCESS):
                    decoder = ladder.decoder_for(method, draft, verifier, settings)
                    result = decoder.generate(request)
                    row = ladder.record(method, result, verifier.last_open_s, tokens)
                    row["prompt"] = prompt.index
                    rows.append(row)
            references[str(prompt.index)] = ref
            progress("in-process", f"prompt {n + 1}/{len(prompts)}: {len(ref['command'])} tokens, "
                                   f"{ref['command_text']!r}")
    write_result(job, {"rows": rows, "references": references})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
