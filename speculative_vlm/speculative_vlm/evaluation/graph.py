"""Episodes through the full ROS graph: the same outcome end to end as in-process.

Each episode runs in a fresh process (``python -m speculative_vlm.evaluation.graph WORKDIR``), as
``speculative-vlm up`` would run it: the simulated Go2 (a separate process speaking the SDK
protocol over DDS, with the episode's scene and start posture), a local verifier (a separate
process serving the target over gRPC), and the camera, motion, bridge and drafter nodes of
``config/sim.yaml`` on one executor. The instruction goes to the drafter as an ``Instruct`` goal;
the simulator's own state stream (``rt/sportmodestate``) gives the ground-truth trajectory and
posture, and the episode is judged by the same success rule as in-process. Real time and real
DDS make a graph run a little different (frame timing, the Move stream's ticks), so the report
shows both outcomes and whether they agree.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from speculative_vlm.commands.prompts import Progress
from speculative_vlm.commands.scene_text import Pose
from speculative_vlm.commands.schema import CommandError, parse_command
from speculative_vlm.evaluation.episodes import Episode
from speculative_vlm.evaluation.runner import EpisodeResult, StepRecord
from speculative_vlm.go2.sim_model import Mode

GRAPH_NODES = ["camera", "motion", "bridge", "drafter"]
# Instruct outcomes (speculative_vlm_msgs/Instruct) -> the in-process runner's endings.
_ENDINGS = {0: "done", 1: "step_limit", 2: "invalid"}


class GraphEpisodeError(RuntimeError):
    """A graph episode could not run; the message says which part failed."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scene_yaml(episode: Episode) -> dict:
    """The episode's scene as a scene file for ``speculative-vlm-sim-go2 --scene``."""
    s = episode.scene
    return {
        "room": {k: getattr(s.room, k) for k in ("x_min", "x_max", "y_min", "y_max", "wall_height")},
        "start": {"x": s.start_x, "y": s.start_y, "yaw": s.start_yaw},
        "objects": [{"name": o.name, "shape": o.shape, "colour": list(o.colour), "x": o.x, "y": o.y, "size": o.size}
                    for o in s.objects],
    }


def bringup_yaml(base: Path, target: str, draft: str, go2_domain: int, port: int, max_steps: int,
                 progress_line: bool = True, perception: str = "scene_text") -> dict:
    """The sim config with this episode's models, perception, ports and domain (exits off: they never change
    output)."""
    sections = yaml.safe_load(base.read_text())
    sections.pop("foxglove", None)
    b = sections["bringup"]["ros__parameters"]
    b.update(nodes=GRAPH_NODES, sim_go2=False, local_cloud=True, instruction="", max_steps=max_steps)
    cloud = sections["cloud_server"]["ros__parameters"]
    cloud.update(model=target, exit_layers=[], exit_heads="", bind=f"127.0.0.1:{port}")
    sections["bridge"]["ros__parameters"]["cloud_address"] = f"127.0.0.1:{port}"
    for node in ("camera", "motion"):
        sections[node]["ros__parameters"]["dds_domain_id"] = go2_domain
    drafter = sections["drafter"]["ros__parameters"]
    drafter.update(draft_model=draft, max_steps=max_steps, progress_line=progress_line, perception=perception)
    return sections


def run_graph_episodes(
    episodes: Sequence[Episode],
    spec: str,
    config: Path,
    inprocess: Sequence[EpisodeResult] = (),
    name: str = "",
    timeout_s: float = 600.0,
    progress_line: bool | None = None,
) -> list[dict]:
    """Run each episode through the graph with the policy ``spec`` (``TARGET+DRAFT``, or ``image:TARGET+DRAFT``
    for a VLM target: the drafter sends the frame); one row each.

    ``progress_line`` is the drafter's parameter (None: the config's, as the in-process runs take it)."""
    from speculative_vlm.evaluation.success import judge

    perception = "image" if spec.startswith("image:") else "scene_text"
    target, _, draft = spec.removeprefix("image:").partition("+")
    if spec == "expert" or not draft:
        raise GraphEpisodeError(f"--graph needs a model policy with a draft (TARGET+DRAFT), got {spec!r}: the "
                                "drafter node always drafts, and the expert is no model")
    by_id = {r.episode.id: r for r in inprocess}
    if progress_line is None:
        from speculative_vlm.evaluation.world import WorldConfig

        progress_line = WorldConfig.from_config(config).progress_line
    rows = []
    for episode in episodes:
        with tempfile.TemporaryDirectory(prefix="speculative_vlm_graph_") as tmp:
            work = Path(tmp)
            go2_domain = random.Random().randint(121, 230)
            (work / "scene.yaml").write_text(yaml.safe_dump(scene_yaml(episode)))
            (work / "bringup.yaml").write_text(yaml.safe_dump(
                bringup_yaml(config, target, draft, go2_domain, _free_port(), episode.max_steps, progress_line,
                             perception)))
            (work / "episode.json").write_text(json.dumps({
                "instruction": episode.instruction, "max_steps": episode.max_steps,
                "start_mode": episode.start_mode.name.lower(), "go2_domain": go2_domain}))
            env = dict(os.environ, ROS_DOMAIN_ID=str(random.Random().randint(1, 100)),
                       ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
            started = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "speculative_vlm.evaluation.graph", str(work)],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
            if proc.returncode != 0 or not (work / "result.json").exists():
                tail = (proc.stdout + proc.stderr)[-2500:]
                raise GraphEpisodeError(f"graph episode {episode.id} failed (exit {proc.returncode}):\n{tail}")
            data = json.loads((work / "result.json").read_text())
        result = _as_result(episode, name or spec, data)
        result.success, result.why = judge(result)
        mine = by_id.get(episode.id)
        row = {
            "episode": episode.id, "family": episode.intent.family.value, "instruction": episode.instruction,
            "graph": f"{'ok' if result.success else 'FAIL'} ({result.why})", "graph_steps": len(result.steps),
            "graph_success": result.success, "graph_texts": [s.text for s in result.steps],
            "graph_outcome": data["reason"], "wall_s": round(time.monotonic() - started, 1),
        }
        if mine is not None:
            row.update(inprocess=f"{'ok' if mine.success else 'FAIL'} ({mine.why})", inprocess_steps=len(mine.steps),
                       same=mine.success == result.success and [s.text for s in mine.steps] == row["graph_texts"],
                       same_verdict=mine.success == result.success,
                       same_prefix=_common_prefix([s.text for s in mine.steps], row["graph_texts"]),
                       end_gap_m=round(math.hypot(mine.final.x - result.final.x, mine.final.y - result.final.y), 3))
        else:
            row.update(inprocess="-", inprocess_steps="-", same=False, same_verdict=False, same_prefix=0, end_gap_m="-")
        rows.append(row)
    return rows


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _as_result(episode: Episode, policy: str, data: dict) -> EpisodeResult:
    """An in-process-style result from what the graph worker recorded, for the same judge."""
    steps = []
    for i, text in enumerate(data["texts"], start=1):
        try:
            command = parse_command(text)
        except CommandError:
            command = None
        steps.append(StepRecord(i, Pose(), episode.start_mode, "", "", text, command, None, Pose(), episode.start_mode))
    x, y, yaw = data["final"]
    ended = "refused" if data["refused"] else _ENDINGS.get(data["outcome"], "failed")
    return EpisodeResult(episode, policy, steps, ended, [tuple(p) for p in data["path"]], Pose(x, y, yaw),
                         Mode[data["mode"]], data["forward"], data["left"], data["turned"], data["max_offset"])


# ---- the worker process ------------------------------------------------------------------------
def _worker(work: Path) -> int:
    import rclpy
    from nav_msgs.msg import Odometry
    from rclpy.action import ActionClient
    from unitree_sdk2py.core.channel import ChannelSubscriber
    from unitree_sdk2py.idl.unitree_go.msg.dds_ import SportModeState_

    from speculative_vlm.bringup import Peers, load_config, node_class, start_peers, stop_graph
    from speculative_vlm.go2.dds import init_domain
    from speculative_vlm.nodes.spin import PoolExecutor
    from speculative_vlm_msgs.action import Instruct

    episode = json.loads((work / "episode.json").read_text())
    config = load_config(work / "bringup.yaml")
    peers, nodes = Peers(), []
    lock = threading.Lock()
    track: dict = {"path": [], "progress": None, "max_offset": 0.0, "pose": None, "mode": None}

    def on_state(msg: SportModeState_) -> None:
        pose = Pose(float(msg.position[0]), float(msg.position[1]), float(msg.imu_state.rpy[2]))
        with lock:
            if track["progress"] is None:
                track["progress"] = Progress(pose)
            p = track["progress"]
            p.update(pose)
            track["max_offset"] = max(track["max_offset"], math.hypot(pose.x - p.start.x, pose.y - p.start.y))
            track["pose"], track["mode"] = pose, Mode(int(msg.mode))
            if not track["path"] or math.dist(track["path"][-1][:2], (pose.x, pose.y)) > 0.02:
                track["path"].append((pose.x, pose.y, pose.yaw))

    rclpy.init(args=["--ros-args", "--params-file", str(config.path)])
    executor = PoolExecutor()
    spinner = threading.Thread(target=executor.spin, daemon=True)
    try:
        peers.start("sim-go2", [sys.executable, "-m", "speculative_vlm.go2.sim", "--domain-id",
                                str(episode["go2_domain"]), "--interface", "lo", "--scene", str(work / "scene.yaml"),
                                "--start-mode", episode["start_mode"]], "ready", timeout_s=60)
        start_peers(config, peers)
        init_domain(episode["go2_domain"], "lo")
        state = ChannelSubscriber("rt/sportmodestate", SportModeState_)
        state.Init(on_state, 10)
        for name in config.nodes:
            nodes.append(node_class(name)())
            executor.add_node(nodes[-1])
        client_node = rclpy.create_node("eval_client")
        odom_seen = threading.Event()
        client_node.create_subscription(Odometry, "odom", lambda _msg: odom_seen.set(), 10)
        executor.add_node(client_node)
        spinner.start()
        client = ActionClient(client_node, Instruct, "instruct")
        if not client.wait_for_server(timeout_sec=60.0):
            raise GraphEpisodeError("the drafter's instruct action did not come up within 60 s")
        # The motion node is active (odometry flows, so the drafter's progress line has its start).
        _wait(lambda: odom_seen.is_set() and track["pose"] is not None, 60.0, "no odometry")
        with lock:
            track["progress"], track["path"], track["max_offset"] = None, [], 0.0  # measured from the goal on
        texts: dict[int, str] = {}

        def on_feedback(fb) -> None:
            if fb.feedback.command.text:
                texts[fb.feedback.step] = fb.feedback.command.text

        goal = Instruct.Goal(instruction=episode["instruction"], max_steps=episode["max_steps"])
        send = client.send_goal_async(goal, feedback_callback=on_feedback)
        _wait(send.done, 60.0, "the goal was not answered")
        handle = send.result()
        outcome, reason, refused = -1, "refused: the drafter rejected the goal", not handle.accepted
        if handle.accepted:
            future = handle.get_result_async()
            _wait(future.done, 900.0, "the goal did not end")
            result = future.result().result
            outcome, reason = int(result.outcome), result.reason
        time.sleep(1.0)  # the robot comes to rest after the last StopMove; late feedback arrives
        if outcome == 0 and len(texts) == len(result.commands):  # the done step's feedback never came
            texts[max(texts, default=0) + 1] = '{"action":"done","vx":0.0,"vy":0.0,"vyaw":0.0,"duration":0.0}'
        with lock:
            p = track["progress"] or Progress(track["pose"])
            data = {
                "outcome": outcome, "reason": reason, "refused": refused,
                "texts": [texts[k] for k in sorted(texts)], "path": track["path"],
                "final": [track["pose"].x, track["pose"].y, track["pose"].yaw], "mode": track["mode"].name,
                "forward": p.forward, "left": p.left, "turned": p.turned, "max_offset": track["max_offset"],
            }
        (work / "result.json").write_text(json.dumps(data))
        return 0
    finally:
        stop_graph(executor, nodes, peers)


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise GraphEpisodeError(f"{what} within {timeout_s:.0f} s")
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
