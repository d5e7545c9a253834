"""`speculative-vlm bench`: run every method side by side and write the report, CSV and plots.

    speculative-vlm bench            # full: the sim config's target + the shipped draft (~10 min on 2 cores)
    speculative-vlm bench --quick    # tiny random models, seconds; what the test suite runs

Phases, each in its own pinned processes: (1) in one process, the target alone (which fixes
the reference outputs) against speculative decoding; (2) the robot process against two
verifier server processes through delay proxies at each RTT profile, every method on every
prompt, then the ROS hop; (3) the fleet, batched and unbatched. Any lossless method whose
output differs from the target's own makes the command fail (exit code 1) after the report
is written, so the report shows where.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from speculative_vlm.benchmark import ladder
from speculative_vlm.benchmark.netem import LinkProfile
from speculative_vlm.benchmark.processes import (
    BenchProcessError,
    CloudServer,
    ServerSpec,
    child_env,
    progress,
    start_worker,
)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # speculative_vlm/ (the ament package)
DEFAULT_DRAFT = PACKAGE_ROOT / "models" / "command-draft"
DEFAULT_OUT = PACKAGE_ROOT / "bench" / "results"
STAND_IN_DRAFT = "smollm2-135m-instruct"  # in bfloat16, until a trained draft is shipped


@dataclass(frozen=True)
class BenchOptions:
    """What to run (``speculative-vlm bench`` sets each from its flag of the same name; its help says more).

    Lists are comma-separated, as on the command line; None picks the mode's default (quick or full).
    """

    quick: bool = False  # tiny random models and few prompts (CI)
    out: Path | None = None  # results folder (None: DEFAULT_OUT; quick: a temporary folder)
    target: str | None = None  # None: the sim config's cloud_server model (the trained target)
    draft: str | None = None  # None: DEFAULT_DRAFT when it holds a model, else STAND_IN_DRAFT in bfloat16
    draft_dtype: str | None = None
    exit_layers: str | None = None  # None: the earliest trained layer, or 3/4 depth without trained heads
    exit_heads: str | None = None  # None: the checkpoint shipped under models/, if any
    early_threshold: float = ladder.EARLY_THRESHOLD
    prompts: int | None = None  # per method and RTT (full: 10)
    free_prompts: int | None = None  # for the grammar-off rung (full: 3)
    rtts: str = "5,20,60,150"  # RTT profiles, ms
    methods: str = ",".join(m.key for m in ladder.NETWORKED)  # the ladder's rungs decoded at every RTT
    bandwidth_mbps: float = 20.0
    jitter_ms: float = 0.0
    gamma: int = 4
    max_new_tokens: int = 64
    fleet: str = "1,2,4,8"  # robot counts
    fleet_commands: int | None = None  # per fleet robot (full: 3)
    fleet_rtt: float = 20.0
    fleet_max_wait_ms: float = 10.0
    fleet_replicas: str | None = None  # verifier replica counts on Ray Serve (full: 1,2; quick: none)
    ros_rtt: float = 20.0
    no_ros: bool = False
    robot_core: int = 0
    cloud_core: int = 1
    inprocess_threads: int = 2
    perception: str | None = None  # scene_text | image (the frame to a VLM target); None: the sim config's drafter's


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def resolve_draft(options: BenchOptions) -> tuple[str, str | None, bool]:
    """(draft path, dtype, is_stand_in)."""
    if options.draft:
        return options.draft, options.draft_dtype, False
    if (DEFAULT_DRAFT / "config.json").exists():
        return str(DEFAULT_DRAFT), options.draft_dtype, False
    return STAND_IN_DRAFT, options.draft_dtype or "bfloat16", True


def run_bench(options: BenchOptions) -> int:
    """Run every phase, write the report to ``options.out``; 1 when a lossless method's output differs."""
    from speculative_vlm.benchmark import report
    from speculative_vlm.benchmark.fleet import run_fleet
    from speculative_vlm.benchmark.netem import DelayProxy
    from speculative_vlm.benchmark.workload import build_prompts, contact_sheet
    from speculative_vlm.evaluation.world import SIM_CONFIG, WorldConfig
    from speculative_vlm.training.train_exits import config_target

    started = time.time()
    load_before = os.getloadavg()[0]  # other work on the machine makes timings noisy; the report says how busy it was
    workdir = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    quick = options.quick
    out = options.out or (workdir / "results" if quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        from speculative_vlm.benchmark.quick_models import build

        target, draft = build(workdir)
        draft_dtype, stand_in = None, False
    else:
        target = options.target or config_target(SIM_CONFIG)
        draft, draft_dtype, stand_in = resolve_draft(options)
    n_prompts = options.prompts or (2 if quick else 10)
    free_prompts = min(n_prompts, options.free_prompts if options.free_prompts is not None else (1 if quick else 3))
    per_robot = options.fleet_commands or (1 if quick else 3)
    rtts = _ints(options.rtts) if not quick or options.rtts != BenchOptions.rtts else [5, 20]
    methods = [m.strip() for m in options.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {m.key for m in ladder.NETWORKED})
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; the rungs are {[m.key for m in ladder.NETWORKED]}")
    fleet_sizes = _ints(options.fleet) if not quick or options.fleet != BenchOptions.fleet else [1, 2]
    layers = _target_layers(target)
    exit_heads = None if quick else (options.exit_heads or _config_exit_heads(SIM_CONFIG, target))
    # One exit by default: every exit adds a full-vocabulary head product to each verification
    # pass. Trained: the earliest trained layer, because preemption only pays when the early
    # verdict leaves time to draft the next block before the pass ends (and then a miss costs
    # nothing but that hidden drafting). Untrained: 3/4 depth, as earlier ones are mostly wrong.
    if options.exit_layers:
        exit_layers = tuple(_ints(options.exit_layers))
    elif exit_heads:
        exit_layers = (min(_checkpoint_layers(exit_heads)),)
    else:
        exit_layers = (max(0, min(layers - 2, (3 * layers) // 4)),)
    robot_cores, cloud_cores = [options.robot_core], [options.cloud_core]
    cpus = sorted(os.sched_getaffinity(0))
    progress("bench", f"{'quick' if quick else 'full'} run: target {target}, draft {draft}"
                      f"{' (stand-in, ' + str(draft_dtype) + ')' if stand_in else ''}, {n_prompts} prompts, "
                      f"RTTs {rtts} ms, exits at {list(exit_layers)}, fleet {fleet_sizes}; work in {workdir}")
    # As the sim config's drafter asks: with the progress line when it sends one (the trained target reads it).
    drafter = WorldConfig.from_config(SIM_CONFIG)
    # The quick run's tiny target reads text; a full run asks as the sim config's drafter asks.
    image = (options.perception or ("scene_text" if quick else drafter.perception)) == "image"
    prompts, frames = build_prompts(n_prompts, progress=drafter.progress_line, image=image)
    prompt_json = [p.to_json() for p in prompts]
    common = {"target": target, "draft": draft, "draft_dtype": draft_dtype, "prompts": prompt_json,
              "gamma": options.gamma, "max_new_tokens": options.max_new_tokens, "free_prompts": free_prompts,
              "early_threshold": options.early_threshold}

    # (1) One process: target alone (the references) against speculative decoding.
    progress("bench", "phase 1/3: one process, target alone vs speculative (references)")
    inproc = start_worker("inprocess", "speculative_vlm.benchmark.inprocess_side", common, workdir, cpus,
                          options.inprocess_threads).result()
    references = inproc["references"]

    # (2) Robot and cloud processes through the delay proxy.
    progress("bench", "phase 2/3: robot and cloud processes through the delay proxy")
    # The robot's one token opens sessions on both servers, as one client of one cloud.
    tokens = [secrets.token_hex(16)]
    servers = {"plain": CloudServer(ServerSpec("plain", target), cloud_cores, workdir, tokens=list(tokens)).start(),
               "exits": CloudServer(ServerSpec("exits", target, exit_layers, exit_heads), cloud_cores, workdir,
                                    tokens=list(tokens)).start()}
    proxies: list[DelayProxy] = []
    bridge = None
    try:
        for s in servers.values():
            s.wait_ready()
        addresses: dict[str, dict[str, str]] = {}
        for rtt in sorted(set(rtts) | {int(options.ros_rtt)}):
            addresses[str(rtt)] = {}
            for kind, server in servers.items():
                proxy = DelayProxy(server.address, _profile(rtt, options)).start()
                proxies.append(proxy)
                addresses[str(rtt)][kind] = proxy.address
        token = tokens[0]
        ros = None
        env = {}
        if not options.no_ros:
            domain = str(secrets.randbelow(100) + 101)  # away from the test suite's 1..100
            env = {"ROS_DOMAIN_ID": domain, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
            bridge = _start_bridge(addresses[str(int(options.ros_rtt))]["exits"], token, workdir, robot_cores, env)
            ros = {"rtt_ms": options.ros_rtt}
        robot_job = dict(common, references=references, rtts_ms=rtts, addresses=addresses, token=token, methods=methods,
                         free_rtt_ms=20 if 20 in rtts else rtts[0], ros=ros)
        robot = start_worker("robot", "speculative_vlm.benchmark.robot_side", robot_job, workdir, robot_cores, 1,
                             env=env).result()
    finally:
        if bridge is not None:
            bridge.terminate()
        for p in proxies:
            p.stop()
        for s in servers.values():
            s.stop()

    # (3) The fleet, with the acceptance and drafting speed the real draft reached above.
    load = _fleet_load(robot["rows"], options, quick)
    progress("bench", f"phase 3/3: fleet {fleet_sizes} robots, batched and unbatched "
                      f"(replayed drafts: acceptance {load['acceptance']:.2f}, {load['draft_s_per_token'] * 1e3:.1f} "
                      f"ms/token, {load['gamma']} per block)")
    commands = [{"prompt": p.to_json(), "reference": references[str(p.index)]["command"],
                 "forced": references[str(p.index)]["command_forced"]} for p in prompts]
    fleet_servers = {True: ServerSpec("fleet-batched", target, max_batch=max(fleet_sizes),
                                      max_wait_ms=options.fleet_max_wait_ms, metrics=True),
                     False: ServerSpec("fleet-unbatched", target, max_batch=1, metrics=True)}
    running = {b: CloudServer(spec, cloud_cores, workdir, clients=max(fleet_sizes)).start()
               for b, spec in fleet_servers.items()}
    fleet_proxies = []
    try:
        endpoints = {}
        for b, server in running.items():
            server.wait_ready()
            proxy = DelayProxy(server.address, _profile(options.fleet_rtt, options)).start()
            fleet_proxies.append(proxy)
            endpoints[b] = (server, proxy.address)
        load["vocab"] = _vocab(target)
        points = run_fleet(endpoints, fleet_sizes, commands, per_robot, load, workdir, robot_cores)
    finally:
        for p in fleet_proxies:
            p.stop()
        for s in running.values():
            s.stop()
    replica_counts = _ints(options.fleet_replicas if options.fleet_replicas is not None else ("" if quick else "1,2"))
    replica_points = _replica_fleets(replica_counts, target, max(fleet_sizes), commands, per_robot, load, options,
                                     workdir, cloud_cores, robot_cores)

    meta = {"quick": quick, "target": target, "draft": draft, "draft_dtype": draft_dtype, "stand_in": stand_in,
            "prompts": n_prompts, "progress_line": bool(prompts and prompts[0].progress),
            "perception": "image" if image else "scene_text", "free_prompts": free_prompts, "rtts_ms": rtts, "methods": methods,
            "bandwidth_mbps": options.bandwidth_mbps,
            "jitter_ms": options.jitter_ms, "exit_layers": list(exit_layers), "exit_heads": exit_heads,
            "early_threshold": options.early_threshold,
            "target_layers": layers, "gamma": options.gamma, "max_new_tokens": options.max_new_tokens,
            "fleet_sizes": fleet_sizes, "fleet_commands_per_robot": per_robot, "fleet_rtt_ms": options.fleet_rtt,
            "fleet_max_wait_ms": options.fleet_max_wait_ms, "fleet_replicas": replica_counts, "fleet_load": load, "ros_rtt_ms": None if options.no_ros
            else options.ros_rtt, "robot_cores": robot_cores, "cloud_cores": cloud_cores,
            "inprocess_threads": options.inprocess_threads, "inprocess_cores": cpus,
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
            "minutes": round((time.time() - started) / 60, 1), "prompt_list": prompt_json,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "cpus": len(cpus)}
    results = {"meta": meta, "inprocess": inproc["rows"], "robot": robot["rows"],
               "fleet": [p.to_json() for p in points], "fleet_replicas": [p.to_json() for p in replica_points],
               "references": references}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write(out, results, frames_image=contact_sheet(frames))
    failures = report.exactness_failures(results)
    progress("bench", f"report written to {out} in {meta['minutes']} min")
    if not failures and workdir not in out.resolve().parents:
        shutil.rmtree(workdir, ignore_errors=True)  # logs and jobs are kept only when something failed
    if failures:
        progress("bench", "LOSSLESSNESS FAILED: " + "; ".join(failures[:10]))
        return 1
    return 0


def _config_exit_heads(config: Path, target: str) -> str | None:
    """The exit heads the config's verifier serves ``target`` with (its cloud_server ``exit_heads``), when
    ``target`` is that verifier's model; else None (the untrained shared head)."""
    import yaml

    from speculative_vlm.decoding import model_store

    cloud = (yaml.safe_load(Path(config).read_text()).get("cloud_server") or {}).get("ros__parameters") or {}
    if cloud.get("model") != target or not cloud.get("exit_heads"):
        return None
    return str(model_store.resolve_file(cloud["exit_heads"]))


def _checkpoint_layers(path: str) -> list[int]:
    import torch

    return sorted(int(k) for k in torch.load(path, map_location="cpu", weights_only=True)["state"])


def _profile(rtt_ms: float, options: BenchOptions) -> LinkProfile:
    return LinkProfile(rtt_ms / 2000, options.jitter_ms / 1000,
                       options.bandwidth_mbps * 1e6 if options.bandwidth_mbps > 0 else None)


def _target_layers(target: str) -> int:
    from transformers import AutoConfig

    from speculative_vlm.decoding import model_store

    config = AutoConfig.from_pretrained(model_store.resolve(target))
    return int(config.get_text_config(decoder=True).num_hidden_layers)


def _vocab(target: str) -> int:
    from transformers import AutoConfig

    from speculative_vlm.decoding import model_store

    return int(AutoConfig.from_pretrained(model_store.resolve(target)).get_text_config(decoder=True).vocab_size)


def _replica_fleets(counts: list[int], target: str, robots: int, commands: list[dict], per_robot: int, load: dict,
                    options: BenchOptions, workdir: Path, cloud_cores: list[int], robot_cores: list[int]) -> list:
    """The largest fleet against each count of verifier replicas on Ray Serve (one local Ray
    cluster each, on the cloud's cores), batched like the batched server."""
    from speculative_vlm.benchmark.fleet import run_replicas
    from speculative_vlm.benchmark.netem import DelayProxy

    points = []
    for n in counts:
        progress("bench", f"fleet on Ray Serve: {robots} robots against {n} verifier replica(s)")
        server = CloudServer(ServerSpec(f"fleet-replicas-{n}", target, max_batch=robots,
                                        max_wait_ms=options.fleet_max_wait_ms, replicas=n),
                             cloud_cores, workdir, clients=robots).start()
        proxy = None
        try:
            server.wait_ready()
            proxy = DelayProxy(server.address, _profile(options.fleet_rtt, options)).start()
            points += run_replicas({n: (server, proxy.address)}, robots, commands, per_robot, load, workdir,
                                   robot_cores)
        finally:
            if proxy is not None:
                proxy.stop()
            server.stop()
    return points


def _fleet_load(rows: list[dict], options: BenchOptions, quick: bool) -> dict:
    """The replay robots' drafting: the full method's measured acceptance and time per drafted token."""
    full = [r for r in rows if r["method"] == ladder.PIPELINE.key and r["transport"] == "grpc"]
    drafted = sum(r["drafted"] for r in full)
    acceptance = sum(r["accepted"] for r in full) / drafted if drafted else 0.7
    per_token = sum(r["draft_s"] for r in full) / drafted if drafted else 0.01
    return {"acceptance": round(acceptance, 4), "draft_s_per_token": round(per_token, 5), "gamma": options.gamma,
            "max_new_tokens": options.max_new_tokens}


def _start_bridge(address: str, token: str, workdir: Path, cores: list[int], env: dict[str, str]):
    """The bridge node as its own process (robot side), its gRPC client pointed at the proxy."""
    import subprocess
    import sys

    token_file = workdir / "bridge-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    log = open(workdir / "bridge.log", "w")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "speculative_vlm.nodes.bridge", "--ros-args", "-p", f"cloud_address:={address}",
         "-p", f"auth_token_file:={token_file}", "-p", "deadline_s:=120.0", "-p", "open_timeout_s:=120.0"],
        stdout=log, stderr=subprocess.STDOUT, env=child_env(1, env),
        preexec_fn=lambda: os.sched_setaffinity(0, set(cores) & os.sched_getaffinity(0) or os.sched_getaffinity(0)))


__all__ = ["BenchOptions", "run_bench", "BenchProcessError"]
