"""One-process bringup: ``speculative-vlm up CONFIG`` starts the node graph a YAML config names.

The nodes named in the config's ``bringup`` section run in this process on one multi-threaded
executor, each reading its own ``ros__parameters`` section of the same YAML (the file is passed as
a global ``--params-file``, exactly as launch files pass it). Peers that are separate machines in
real life run as separate processes: the simulated Go2 (``speculative-vlm-sim-go2``) and the local
cloud verifier (``speculative-vlm-cloud``). With an ``instruction`` the bringup sends it as an
``Instruct`` goal, prints every step and a summary, and exits (0 only when the model said the task
is done, :data:`GOAL_NOT_ACHIEVED` when the goal ended otherwise); without one it runs until Ctrl-C.
At the end of an instruction it also writes a top-down PNG of the robot's path (from ``odom``), the
simulated scene's objects and the object the instruction names, and prints where it is.
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# node name -> "module:Class"; each class takes only **kwargs for rclpy.node.Node
NODE_CLASSES = {
    "camera": "speculative_vlm.nodes.camera:CameraNode",
    "motion": "speculative_vlm.nodes.motion:MotionNode",
    "bridge": "speculative_vlm.nodes.bridge:BridgeNode",
    "drafter": "speculative_vlm.nodes.drafter:DrafterNode",
    "monitor": "speculative_vlm.nodes.monitor:MonitorNode",
}


# Exit status of `up` with an instruction: 0 when the model said done, this when the goal ended
# otherwise (step limit, refusal, lost link...; the summary says which), 1 when it could not run.
GOAL_NOT_ACHIEVED = 2


class BringupError(RuntimeError):
    """The config cannot be brought up; the message says which part and why."""


@dataclass
class BringupConfig:
    path: Path
    nodes: list[str]
    sim_go2: bool = False
    sim_scene: str = "default"
    local_cloud: bool = False
    instruction: str = ""
    max_steps: int = 0
    sections: dict = field(default_factory=dict)
    plot: str | None = None  # top-down PNG of the run; None = a new file under runs_dir(), "" = none

    def params(self, section: str) -> dict:
        return dict((self.sections.get(section) or {}).get("ros__parameters") or {})


def load_config(path: str | os.PathLike) -> BringupConfig:
    path = Path(path)
    if not path.is_file():
        raise BringupError(f"config {path} does not exist")
    with open(path, encoding="utf-8") as f:
        sections = yaml.safe_load(f) or {}
    b = (sections.get("bringup") or {}).get("ros__parameters")
    if b is None:
        raise BringupError(f"{path} has no bringup: ros__parameters: section")
    unknown = [n for n in b.get("nodes", []) if n not in NODE_CLASSES]
    if unknown:
        raise BringupError(f"{path} names unknown nodes {unknown}; known: {sorted(NODE_CLASSES)}")
    return BringupConfig(
        path=path, nodes=list(b.get("nodes", [])), sim_go2=bool(b.get("sim_go2", False)),
        sim_scene=str(b.get("sim_scene", "default")), local_cloud=bool(b.get("local_cloud", False)),
        instruction=str(b.get("instruction", "")), max_steps=int(b.get("max_steps", 0)), sections=sections,
    )


def node_class(name: str):
    module, _, cls = NODE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


class Peers:
    """The separate processes of a bringup (simulated Go2, local verifier), stopped together."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], ready_line: str, timeout_s: float) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.procs.append((name, proc))
        deadline = time.monotonic() + timeout_s
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if ready_line in line:
                # Keep draining so the peer never blocks on a full pipe.
                threading.Thread(target=_drain, args=(proc, name), daemon=True).start()
                return proc
        self.stop()
        tail = "\n  ".join(lines[-15:])
        raise BringupError(f"{name} did not become ready within {timeout_s:.0f} s:\n  {tail}")

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()


def _drain(proc: subprocess.Popen, name: str) -> None:
    verbose = os.environ.get("SPECULATIVE_VLM_VERBOSE_PEERS")
    for line in proc.stdout:
        if verbose:
            print(f"[{name}] {line.rstrip()}", flush=True)


def start_peers(config: BringupConfig, peers: Peers) -> None:
    """Start the simulated Go2 and the local verifier when the config asks for them."""
    if config.sim_go2:
        motion = config.params("motion")
        argv = [sys.executable, "-m", "speculative_vlm.go2.sim",
                "--domain-id", str(motion.get("dds_domain_id", 0)),
                "--interface", str(motion.get("network_interface", "lo"))]
        if config.sim_scene not in ("", "default"):
            argv += ["--scene", config.sim_scene]
        print(f"starting the simulated Go2 (DDS domain {motion.get('dds_domain_id', 0)})", flush=True)
        peers.start("sim-go2", argv, "ready", timeout_s=60)
    if config.local_cloud:
        model = config.params("cloud_server").get("model", "?")
        print(f"starting the local verifier (target {model}); loading takes a few seconds", flush=True)
        # The verifier reads its own section of the config: no copy of it is written anywhere.
        peers.start("cloud", [sys.executable, "-m", "speculative_vlm.cloud.server", "--config", str(config.path),
                              "--config-section", "cloud_server"], '"event": "serving"', timeout_s=300)


def stop_graph(executor: Any, nodes: list[Any], peers: Peers) -> None:
    """Take down what a bringup (or one graph evaluation episode) started: the nodes, ROS and the peers."""
    import rclpy

    # StopMove first, while everything still runs; then stop the executor before destroying
    # nodes (destroying under a spinning executor races with its wait set).
    for node in nodes:
        if hasattr(node, "halt"):
            node.halt()
    executor.shutdown(timeout_sec=2.0)
    for node in nodes:
        node.destroy_node()
    rclpy.try_shutdown()
    peers.stop()


def run_bringup(config: BringupConfig) -> int:
    import rclpy

    from speculative_vlm.nodes.spin import PoolExecutor

    peers = Peers()
    nodes = []
    rclpy.init(args=["--ros-args", "--params-file", str(config.path)])
    executor = PoolExecutor()
    spinner = threading.Thread(target=executor.spin, name="bringup-executor", daemon=True)
    try:
        start_peers(config, peers)
        for name in config.nodes:
            nodes.append(node_class(name)())
            executor.add_node(nodes[-1])
        from speculative_vlm.nodes.foxglove_view import start_for_bringup

        if (view := start_for_bringup(config.sections)) is not None:  # the config's `foxglove` section
            nodes.append(view)
            executor.add_node(view)
        spinner.start()
        print(f"nodes up: {', '.join(config.nodes)}", flush=True)
        if config.instruction:
            return follow_instruction(executor, config)
        print("serving; Ctrl-C to stop", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        return 0
    finally:
        stop_graph(executor, nodes, peers)


def _target_object(config: BringupConfig, instruction: str):
    """The simulated scene and the object the instruction names (for the summary), or None for each.

    A config without the simulated Go2 has no scene file: the world is whatever the robot sees.
    """
    from speculative_vlm.go2.scene import load_scene

    if not config.sim_go2:
        return None, None
    try:
        scene = load_scene(None if config.sim_scene in ("", "default") else config.sim_scene)
    except Exception:  # the summary is a courtesy; a scene problem is reported by the sim itself
        return None, None
    return scene, scene.named_in(instruction)


def runs_dir() -> Path:
    """Where ``up`` writes its plots unless told (``$SPECULATIVE_VLM_RUNS``, default ~/.cache/speculative_vlm/runs)."""
    return Path(os.environ.get("SPECULATIVE_VLM_RUNS", Path.home() / ".cache/speculative_vlm/runs"))


def write_topdown(config: BringupConfig, path: list[tuple[float, float]], title: str,
                  end_yaw: float | None = None) -> Path:
    """The run's top-down PNG: ``path`` (odometry positions), the scene's objects, the named goal."""
    from speculative_vlm.evaluation.plots import save_topdown_png

    scene, goal = _target_object(config, config.instruction)
    out = Path(config.plot) if config.plot else runs_dir() / f"up-{time.strftime('%Y%m%d-%H%M%S')}-topdown.png"
    return save_topdown_png(out, path, scene.objects if scene else (), goal, room=scene.room if scene else None,
                            title=title, end_yaw=end_yaw)


def follow_instruction(executor, config: BringupConfig) -> int:
    """Send the config's instruction as an Instruct goal, print each step, then a summary."""
    from nav_msgs.msg import Odometry
    from rclpy.action import ActionClient
    from rclpy.node import Node

    from speculative_vlm.nodes.command_messages import from_msg
    from speculative_vlm.nodes.drafter import outcome_name
    from speculative_vlm_msgs.action import Instruct

    client_node = Node("bringup_client")
    executor.add_node(client_node)
    pose: dict[str, float] = {}
    path: list[tuple[float, float]] = []  # every odometry position, for the top-down plot

    def on_odom(msg: Odometry) -> None:
        pose["x"], pose["y"] = msg.pose.pose.position.x, msg.pose.pose.position.y
        q = msg.pose.pose.orientation
        pose["yaw"] = math.atan2(2 * (q.w * q.z + q.x * q.y), 1 - 2 * (q.y * q.y + q.z * q.z))
        path.append((pose["x"], pose["y"]))

    client_node.create_subscription(Odometry, "odom", on_odom, 10)
    client = ActionClient(client_node, Instruct, "instruct")
    if not client.wait_for_server(timeout_sec=60.0):
        print("error: the drafter's instruct action did not come up within 60 s", flush=True)
        return 1
    deadline = time.monotonic() + 15.0  # odometry starts once the motion node is active
    while not pose and "motion" in config.nodes and time.monotonic() < deadline:
        time.sleep(0.05)
    start = dict(pose)
    scene, target = _target_object(config, config.instruction)
    if target is not None and start:
        print(f"robot at ({start['x']:.2f}, {start['y']:.2f}); {target.name} at ({target.x:.2f}, {target.y:.2f}), "
              f"{scene.distance_to(target.name, start['x'], start['y']):.2f} m away", flush=True)
    print(f"instruction: {config.instruction!r} (at most {config.max_steps or 'default'} steps)", flush=True)
    t0 = time.monotonic()

    def on_feedback(fb) -> None:
        f = fb.feedback
        if f.command.text:  # the step's final feedback carries the parsed command
            c, s = f.command, f.stats
            try:
                shown = from_msg(c).to_text()
            except ValueError:
                shown = c.text
            print(f"step {f.step}: {shown}  [{'verified' if c.verified else 'UNVERIFIED'}; {s.generated} tokens in "
                  f"{s.elapsed_s:.2f} s, acceptance {s.acceptance_rate:.2f}, {s.tokens_per_pass:.2f} tokens/pass, "
                  f"early hits {s.early_hits}/{s.early_hits + s.early_misses}]", flush=True)

    goal = Instruct.Goal(instruction=config.instruction, max_steps=config.max_steps)
    send = client.send_goal_async(goal, feedback_callback=on_feedback)
    while not send.done():
        time.sleep(0.05)
    handle = send.result()
    if not handle.accepted:
        print("error: the drafter refused the goal", flush=True)
        return 1
    result_future = handle.get_result_async()
    while not result_future.done():
        time.sleep(0.05)
    result = result_future.result().result
    time.sleep(0.5)  # the last odometry after the robot stopped
    stats = result.stats
    print("", flush=True)
    print("summary", flush=True)
    # Only the model saying done is success; any other end names its outcome (step limit, ...).
    outcome = "succeeded" if result.success else f"failed ({outcome_name(result.outcome)})"
    print(f"  outcome: {outcome}: {result.reason}", flush=True)
    print(f"  commands executed: {result.steps}; wall time {time.monotonic() - t0:.1f} s", flush=True)
    print(f"  decoding: {stats.generated} tokens in {stats.rounds} rounds, {stats.target_passes} target passes "
          f"({stats.tokens_per_pass:.2f} tokens/pass), acceptance {stats.acceptance_rate:.2f}, early hits "
          f"{stats.early_hits}, misses {stats.early_misses}, {stats.tokens_per_second:.1f} tokens/s", flush=True)
    print(f"  time: drafting {stats.draft_time_s:.2f} s, waiting for verdicts {stats.wait_time_s:.2f} s "
          f"(verification {stats.verify_time_s:.2f} s)", flush=True)
    if pose:
        line = f"  robot ended at ({pose['x']:.2f}, {pose['y']:.2f})"
        if target is not None:
            end_d = scene.distance_to(target.name, pose["x"], pose["y"])
            line += f", {end_d:.2f} m from {target.name}"
            if start:
                line += f" (started {scene.distance_to(target.name, start['x'], start['y']):.2f} m away)"
        print(line, flush=True)
    if config.plot != "" and path:
        try:
            plot = write_topdown(config, list(path), f"{config.instruction!r}: {outcome}", pose.get("yaw"))
            print(f"  top-down plot: {plot.resolve()}", flush=True)
        except Exception as exc:  # the run is over and reported; a plot problem must not hide that
            print(f"  top-down plot not written: {exc}", flush=True)
    executor.remove_node(client_node)
    client.destroy()
    client_node.destroy_node()
    return 0 if result.success else GOAL_NOT_ACHIEVED
