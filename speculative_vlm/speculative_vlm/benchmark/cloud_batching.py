"""Benchmark: tokens per second of N robots on one verifier server, batched against unbatched
(and, with ``--replicas N``, on one replica against N replicas on Ray Serve behind one address).

The server is real (gRPC on loopback, the target model, the batch scheduler). The robots
are load generators: each replays its prompt's target-greedy output (fetched first
through the server's autoregressive mode, which also gives the cloud-autoregressive
baseline) as draft blocks in which every token is right with probability
``--acceptance``, and sleeps ``--draft-ms-per-token`` per drafted token to stand for
drafting on the robot's CPU without taking the shared cores from the server. Every
verified output is checked against the target's own, so a run also checks losslessness.
Optionally the traffic goes through the netem proxy (``--delay-ms``).

    speculative-vlm bench-cloud-batching --model smollm2-135m-instruct --clients 4
"""

from __future__ import annotations

import atexit
import json
import os
import random
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from speculative_vlm.benchmark.fleet_robot import first_divergence, replay
from speculative_vlm.benchmark.netem import DelayProxy, LinkProfile
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.cloud.server import serve
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.protocol.client import GrpcVerifier

PROMPTS = [
    "The red ball is 2 m ahead, slightly left. Walk to it.",
    "Turn right by 90 degrees, then stop.",
    "There is a chair 3 m behind you. Back up to it slowly.",
    "Sit down and wait for the next instruction.",
    "Walk forward 1 m, then turn left and walk 2 m.",
    "The door is on your right, 4 m away. Go through it.",
    "Stand up and look around.",
    "Follow the person in the blue jacket.",
]


@dataclass(frozen=True)
class BatchingOptions:
    """What to measure (``speculative-vlm bench-cloud-batching`` sets each from its flag of the same name)."""

    model: str = "smollm2-135m-instruct"  # target folder or model-store name
    exit_layers: tuple[int, ...] = ()  # early verdicts from these layers
    clients: int = 4  # robots
    max_batch: int = 0  # the batched phase's largest batch (0 = clients)
    max_wait_ms: float = 25.0  # the batched phase's longest added wait
    max_new_tokens: int = 32
    gamma: int = 4  # draft tokens per block
    acceptance: float = 0.8  # chance that a draft token is right
    draft_ms_per_token: float = 3.0  # emulated drafting time on the robot
    delay_ms: float = 0.0  # one-way link delay through the delay proxy (0 = no proxy)
    jitter_ms: float = 0.0
    repeats: int = 1  # alternating batched/unbatched runs; the medians are the result
    threads: int = 0  # torch threads (0 = leave as is)
    replicas: int = 0  # also 1 against this many verifier replicas on Ray Serve (0 = skip)
    json_path: str | None = None  # also write the report here


@dataclass
class PhaseResult:
    max_batch: int
    clients: int
    tokens: int
    wall_s: float  # from the moment every robot's session is open to the last robot's end
    tokens_per_s: float
    rounds: int
    passes: int
    mean_batch: float
    largest_batch: int
    mean_pass_s: float  # server-side time of one verification pass
    mean_queue_wait_s: float  # time a block waited for its pass (queueing + batching wait)
    exact: bool  # every output equals the cloud-autoregressive output
    first_divergence: list[int]  # per robot: first differing position, -1 when identical


def _robot(address: str, token: str, request: SessionRequest, reference: list[int], gamma: int,
           acceptance: float, draft_s_per_token: float, seed: int, vocab: int,
           opened: threading.Barrier) -> tuple[int, int, int]:
    """One robot's decode; returns (tokens, rounds, first position that differs from the reference or -1).

    All robots open (prefill) first and start decoding together at the barrier, so the
    measured time is the decoding that batching can speed up, not the serialized prefills.
    The decode is the fleet's robot (``fleet_robot.replay``) with no grammar: no token is forced.
    """
    verifier = GrpcVerifier(address, token=token, verdict_timeout_s=120)
    session = verifier.open(request)
    opened.wait()
    try:
        out, rounds = replay(session, reference, [False] * len(reference), gamma, acceptance, draft_s_per_token,
                             random.Random(seed), vocab)
    finally:
        session.close()
        verifier.close()
    return len(out), rounds, first_divergence(out, reference)


def _tokens_file(token: str) -> str:
    """A private tokens file for the benchmark's server (removed at exit)."""
    fd, path = tempfile.mkstemp(prefix="bench-tokens-")
    with os.fdopen(fd, "w") as f:
        f.write(f"bench {token}\n")
    atexit.register(os.unlink, path)
    return path


def run_phase(engine, max_batch: int, requests: list[SessionRequest], references: list[list[int]],
              options: BatchingOptions) -> PhaseResult:
    token = secrets.token_hex(16)
    engine.max_batch = max_batch
    config = ServerConfig(bind="127.0.0.1:0", max_batch=max_batch, max_wait_ms=options.max_wait_ms,
                          exit_layers=tuple(engine.exit_layers), tokens_file=_tokens_file(token))
    handle = serve(config, engine=engine)
    results, wall = _drive(handle.port, token, requests, references, options, engine.model.vocab_size)
    sched = handle.service.scheduler

    def histogram_sum(histogram) -> float:
        return sum(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_sum"))

    batch_sum = histogram_sum(handle.metrics.batch_size)
    pass_s = histogram_sum(handle.metrics.verify_latency) / max(1, sched.passes)
    wait_s = histogram_sum(handle.metrics.queue_wait) / max(1, batch_sum)
    handle.stop()
    tokens = sum(r[0] for r in results)
    return PhaseResult(max_batch, len(requests), tokens, round(wall, 3), round(tokens / wall, 2),
                       sum(r[1] for r in results), sched.passes, round(batch_sum / max(1, sched.passes), 2),
                       sched.largest_batch, round(pass_s, 4), round(wait_s, 4), all(r[2] == -1 for r in results),
                       [r[2] for r in results])


def run_replicas_phase(replicas: int, exit_layers: list[int], requests: list[SessionRequest],
                       references: list[list[int]], vocab: int, options: BatchingOptions) -> dict:
    """The same robots against ``replicas`` verifier replicas on Ray Serve behind one address
    (``cloud.ray_serve``); each replica loads ``options.model`` and batches its own sessions."""
    from speculative_vlm.cloud.ray_serve import serve_fleet

    token = secrets.token_hex(16)
    config = ServerConfig(model=options.model, bind="127.0.0.1:0", max_batch=options.max_batch or options.clients,
                          max_wait_ms=options.max_wait_ms, exit_layers=tuple(exit_layers),
                          tokens_file=_tokens_file(token), torch_threads=options.threads or 1)
    handle = serve_fleet(config, replicas)
    try:
        results, wall = _drive(handle.port, token, requests, references, options, vocab)
        placed = len(set(handle.service.placements.values()))
    finally:
        handle.stop()
    tokens = sum(r[0] for r in results)
    return {"replicas": replicas, "clients": len(requests), "replicas_used": placed, "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2), "rounds": sum(r[1] for r in results),
            "exact": all(r[2] == -1 for r in results)}


def _drive(port: int, token: str, requests: list[SessionRequest], references: list[list[int]],
           options: BatchingOptions, vocab: int) -> tuple[list[tuple[int, int, int]], float]:
    """Every robot decodes once through the server on ``port`` (through the delay proxy when
    asked); their results and the wall time from all sessions open to the last robot's end."""
    proxy = None
    address = f"127.0.0.1:{port}"
    if options.delay_ms > 0:
        profile = LinkProfile(options.delay_ms / 1000, options.jitter_ms / 1000)
        proxy = DelayProxy(("127.0.0.1", port), profile).start()
        address = proxy.address
    results: list[tuple[int, int, int] | BaseException] = [None] * len(requests)  # type: ignore[list-item]

    started: list[float] = []
    opened = threading.Barrier(len(requests) + 1, action=lambda: started.append(time.perf_counter()))

    def work(i: int) -> None:
        try:
            results[i] = _robot(address, token, requests[i], references[i], options.gamma, options.acceptance,
                                options.draft_ms_per_token / 1000, seed=i, vocab=vocab, opened=opened)
        except BaseException as exc:
            results[i] = exc
            opened.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    try:
        opened.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    wall = time.perf_counter() - started[0] if started else float("nan")
    if proxy is not None:
        proxy.stop()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results, wall  # type: ignore[return-value]


def run_batching(options: BatchingOptions) -> int:
    """Run the benchmark, print its report (JSON) and write it to ``options.json_path``; 1 when an
    output differs from the target's own."""
    import torch

    from speculative_vlm.decoding.models import load_model
    from speculative_vlm.decoding.target_engine import TargetEngine

    if options.threads:
        torch.set_num_threads(options.threads)
    layers = list(options.exit_layers)
    engine = TargetEngine(load_model(options.model), exit_layers=layers, max_batch=max(1, options.clients))
    requests = [SessionRequest(prompt=PROMPTS[i % len(PROMPTS)],
                               settings=GenerationSettings(max_new_tokens=options.max_new_tokens))
                for i in range(options.clients)]
    # The references come through the server's autoregressive mode: also the cloud-AR baseline.
    token = secrets.token_hex(16)
    handle = serve(ServerConfig(bind="127.0.0.1:0", tokens_file=_tokens_file(token)), engine=engine)
    verifier = GrpcVerifier(handle.address, token=token, verdict_timeout_s=120)
    start = time.perf_counter()
    references = [verifier.generate(r) for r in requests]
    ar_wall = time.perf_counter() - start
    verifier.close()
    handle.stop()
    ar_tokens = sum(len(r) for r in references)
    # Phases alternate (batched, unbatched, batched, ...) so that a burst of load from other
    # processes on a shared machine hits both alike; the medians are the result.
    runs: list[tuple[PhaseResult, PhaseResult]] = []
    for _ in range(max(1, options.repeats)):
        runs.append((run_phase(engine, options.max_batch or options.clients, requests, references, options),
                     run_phase(engine, 1, requests, references, options)))
    batched = sorted((b for b, _ in runs), key=lambda r: r.tokens_per_s)[len(runs) // 2]
    unbatched = sorted((u for _, u in runs), key=lambda r: r.tokens_per_s)[len(runs) // 2]
    report = {
        "model": options.model, "clients": options.clients, "gamma": options.gamma, "acceptance": options.acceptance,
        "draft_ms_per_token": options.draft_ms_per_token, "delay_ms": options.delay_ms,
        "torch_threads": torch.get_num_threads(),
        "cloud_autoregressive_sequential": {"tokens": ar_tokens, "wall_s": round(ar_wall, 3),
                                            "tokens_per_s": round(ar_tokens / ar_wall, 2)},
        "repeats": len(runs),
        "batched": asdict(batched), "unbatched": asdict(unbatched),  # the median runs
        "speedup_batched_over_unbatched": round(batched.tokens_per_s / unbatched.tokens_per_s, 3),
        "all_runs_tokens_per_s": [[b.tokens_per_s, u.tokens_per_s] for b, u in runs],
    }
    if options.replicas:
        from speculative_vlm.cloud.ray_serve import init_ray

        # One local Ray cluster for both fleets; each replica is a process with its own torch threads.
        started_ray = init_ray(num_cpus=os.cpu_count())
        try:
            fleets = [run_replicas_phase(n, layers, requests, references, engine.model.vocab_size, options)
                      for n in sorted({1, options.replicas})]
        finally:
            if started_ray:
                import ray
                import ray.serve

                ray.serve.shutdown()
                ray.shutdown()
        report["replicas"] = fleets
        report["speedup_replicas"] = round(fleets[-1]["tokens_per_s"] / fleets[0]["tokens_per_s"], 3)
        report["cpu_cores"] = os.cpu_count()
    text = json.dumps(report, indent=2)
    print(text)
    if options.json_path:
        with open(options.json_path, "w") as f:
            f.write(text + "\n")
    exact = all(b.exact and u.exact for b, u in runs) and all(f["exact"] for f in report.get("replicas", []))
    return 0 if exact else 1
