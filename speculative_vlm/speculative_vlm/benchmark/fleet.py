"""The fleet: 1, 2, 4, 8 robot processes against one verifier, batched and unbatched; and the
largest fleet against 1 and 2 verifier replicas on Ray Serve behind one address.

One verifier server per mode (``max_batch`` 8 with a short batching wait, or 1), reached
through the delay proxy; the robots are :mod:`fleet_robot` processes pinned to the robot
core, started together, each decoding a few commands in a row. Throughput is the tokens
of all commands over the wall time from the first open to the last verdict.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from speculative_vlm.benchmark.processes import BenchProcessError, CloudServer, progress, start_worker


@dataclass
class FleetPoint:
    batched: bool
    robots: int
    commands: int
    tokens: int
    passes: int
    wall_s: float
    tokens_per_s: float
    p50_s: float
    p95_s: float
    open_s: float  # mean session open (the prompt prefill, one session at a time, plus queueing for it)
    exact: bool
    mean_batch: float = 0.0  # blocks per verification pass (server metrics)
    pass_s: float = 0.0  # mean time of one verification pass
    queue_s: float = 0.0  # mean time a block waited for its pass
    replicas: int = 0  # verifier replicas on Ray Serve behind the address (0: one server process)

    def to_json(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_point(server: CloudServer, address: str, robots: int, batched: bool, commands: list[dict],
              per_robot: int, load: dict, workdir: Path, cores: list[int]) -> FleetPoint:
    """``robots`` processes, robot ``i`` decoding ``per_robot`` commands (rotating over ``commands``)."""
    before = server.scrape()
    go = workdir / f"go-{'b' if batched else 'u'}{robots}"
    workers = []
    for i in range(robots):
        mine = [commands[(i * per_robot + j) % len(commands)] for j in range(per_robot)]
        job = dict(load, address=address, token=server.tokens[i % len(server.tokens)], commands=mine,
                   seed=1000 * robots + i, go_file=str(go))
        workers.append(start_worker(f"fleet-{'b' if batched else 'u'}{robots}-{i}",
                                    "speculative_vlm.benchmark.fleet_robot", job, workdir, cores, 1, echo=False))
    deadline = time.monotonic() + 180
    while not all(Path(str(w.out) + ".ready").exists() for w in workers):
        if time.monotonic() > deadline or any(w.process.poll() is not None for w in workers):
            for w in workers:
                w.stop()
            raise BenchProcessError(f"fleet robots did not all start; see the logs in {workdir}")
        time.sleep(0.02)
    go.touch()
    results = []
    try:
        for w in workers:
            results.append(w.result(timeout=900))
    except BenchProcessError:
        for w in workers:
            w.stop()
        raise
    rows = [r for res in results for r in res["rows"]]
    wall = max(res["ended"] for res in results) - min(r["started"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    latencies = [r["latency_s"] for r in rows]
    after = server.scrape()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    passes = max(delta("svlm_batch_size_count"), 1.0)
    blocks = max(delta("svlm_batch_size_sum"), 1.0)
    return FleetPoint(batched, robots, len(rows), tokens, sum(r["passes"] for r in rows), round(wall, 3),
                      round(tokens / wall, 2), round(statistics.median(latencies), 3),
                      round(percentile(latencies, 0.95), 3), round(statistics.mean(r["open_s"] for r in rows), 3),
                      all(r["exact"] for r in rows), round(blocks / passes, 2),
                      round(delta("svlm_verify_latency_seconds_sum") / passes, 4),
                      round(delta("svlm_queue_wait_seconds_sum") / blocks, 4))


def warm_up(address: str, token: str, command: dict, load: dict) -> None:
    """One command before measuring (not recorded): the server's first passes allocate and pick kernels."""
    import random

    from speculative_vlm.benchmark.fleet_robot import replay
    from speculative_vlm.benchmark.workload import BenchPrompt
    from speculative_vlm.protocol.client import GrpcVerifier

    verifier = GrpcVerifier(address, token=token, verdict_timeout_s=300, open_timeout_s=300)
    try:
        session = verifier.open(BenchPrompt.from_json(command["prompt"]).request(True, load["max_new_tokens"]))
        try:
            replay(session, command["reference"], command["forced"], load["gamma"], load["acceptance"], 0.0,
                   random.Random(0), load["vocab"])
        finally:
            session.close()
    finally:
        verifier.close()


def run_fleet(servers: dict[bool, tuple[CloudServer, str]], sizes: list[int], commands: list[dict], per_robot: int,
              load: dict, workdir: Path, cores: list[int]) -> list[FleetPoint]:
    points = []
    for batched in (True, False):
        server, address = servers[batched]
        warm_up(address, server.tokens[0], commands[0], load)
        for n in sizes:
            point = run_point(server, address, n, batched, commands, per_robot, load, workdir, cores)
            points.append(point)
            progress("fleet", f"{'batched' if batched else 'unbatched'} x{n}: {point.tokens_per_s} tok/s, "
                              f"p50 {point.p50_s:.2f}s p95 {point.p95_s:.2f}s" + ("" if point.exact else " DIFFERS"))
    return points


def run_replicas(servers: dict[int, tuple[CloudServer, str]], robots: int, commands: list[dict], per_robot: int,
                 load: dict, workdir: Path, cores: list[int]) -> list[FleetPoint]:
    """``robots`` robots against each fleet of verifier replicas on Ray Serve ({replicas: (server, address)}).

    The replicas' own batch and pass figures stay in the replicas (the front's metrics have
    none), so those columns are left at 0.
    """
    import dataclasses

    points = []
    for replicas, (server, address) in sorted(servers.items()):
        warm_up(address, server.tokens[0], commands[0], load)
        own = workdir / f"replicas-{replicas}"  # the robots' job and result files apart from the fleet's
        own.mkdir(exist_ok=True)
        point = run_point(server, address, robots, True, commands, per_robot, load, own, cores)
        point = dataclasses.replace(point, replicas=replicas, mean_batch=0.0, pass_s=0.0, queue_s=0.0)
        points.append(point)
        progress("fleet", f"{replicas} replica(s) x{robots} robots: {point.tokens_per_s} tok/s, "
                          f"p50 {point.p50_s:.2f}s p95 {point.p95_s:.2f}s" + ("" if point.exact else " DIFFERS"))
    return points
