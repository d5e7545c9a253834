"""Worker: one robot of the fleet, a load generator that replays known answers as draft blocks.

The fleet measures the verifier, not the robots' CPUs: eight real drafts on the one robot
core this machine can spare would measure that core. So each robot replays the target's own
answer to its prompt: each drafted token is right with the acceptance the real draft reached
in the ladder, drafting takes the real draft's measured time per token (slept, as another CPU
would spend it), blocks have the ladder's length, and the requests use the command grammar,
so tokens the grammar forces are appended without drafting, exactly as the real drafter does.
Every output is compared with the target's own. ``cloud_batching.py``'s robots decode with
the same :func:`replay`, without a grammar (no token forced).

    python -m speculative_vlm.benchmark.fleet_robot JOB.json   (started by `speculative-vlm bench`)
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from speculative_vlm.benchmark.processes import pin, read_job, write_result
from speculative_vlm.benchmark.workload import BenchPrompt
from speculative_vlm.decoding.verifier import DraftBlock, VerdictKind


def replay(session, reference: list[int], forced: list[bool], gamma: int, acceptance: float,
           draft_s_per_token: float, rng: random.Random, vocab: int) -> tuple[list[int], int]:
    """Decode one command by replaying ``reference``; returns (output, target passes)."""
    out: list[int] = []
    passes = 0

    def append_forced() -> None:
        while len(out) < len(reference) and forced[len(out)]:
            out.append(reference[len(out)])

    while True:
        append_forced()
        base = len(out)
        truth = reference[base:base + gamma]
        # A forced position inside a block is never wrong: the draft's mask allows one token.
        block = tuple(t if forced[base + i] or rng.random() < acceptance else (t + 1 + rng.randrange(vocab - 1)) % vocab
                      for i, t in enumerate(truth))
        # The real drafter runs a forward pass for every block token, forced ones included.
        time.sleep(draft_s_per_token * len(block))
        session.submit(DraftBlock(round=passes, base_length=base, base_tail=tuple(out[-8:]), tokens=block))
        while (verdict := session.next_verdict(timeout=300)).kind is VerdictKind.EARLY:
            pass
        if verdict.kind is not VerdictKind.FINAL:
            raise RuntimeError(f"round {passes}: unexpected verdict {verdict}")
        out += list(block[:verdict.accepted]) + ([verdict.token] if verdict.token >= 0 else [])
        passes += 1
        if verdict.eos or len(out) >= len(reference):
            append_forced()  # the grammar's closing tokens, appended on both sides
            return out, passes


def first_divergence(out: list[int], reference: list[int]) -> int:
    """The first position where ``out`` differs from ``reference``, -1 when they are equal."""
    return next((i for i, (a, b) in enumerate(zip(out, reference, strict=False)) if a != b),
                -1 if len(out) == len(reference) else min(len(out), len(reference)))


def main() -> int:
    job = read_job()
    pin(job["cores"])
    from speculative_vlm.protocol.client import GrpcVerifier

    verifier = GrpcVerifier(job["address"], token=job["token"], verdict_timeout_s=300, open_timeout_s=300)
    rng = random.Random(job["seed"])
    rows = []
    # All robots of a fleet start together, so they really compete for the verifier: say we
    # are connected, then wait for the go.
    from speculative_vlm.protocol.link import LinkState

    deadline = time.monotonic() + 60
    while verifier.link_state is not LinkState.CONNECTED and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(job["out"] + ".ready").touch()
    while not Path(job["go_file"]).exists():
        time.sleep(0.005)
    for command in job["commands"]:
        prompt = BenchPrompt.from_json(command["prompt"])
        start = time.monotonic()  # one clock for every process of the fleet
        session = verifier.open(prompt.request(True, job["max_new_tokens"]))
        opened = time.monotonic() - start
        try:
            out, passes = replay(session, command["reference"], command["forced"], job["gamma"], job["acceptance"],
                                 job["draft_s_per_token"], rng, job["vocab"])
        finally:
            session.close()
        diverged = first_divergence(out, command["reference"])
        rows.append({"prompt": prompt.index, "started": start, "latency_s": time.monotonic() - start, "open_s": opened,
                     "tokens": len(out), "passes": passes, "exact": diverged == -1, "first_divergence": diverged})
    verifier.close()
    write_result(job, {"rows": rows, "ended": time.monotonic()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
