"""Test support for the robot side: the simulated Go2 in a subprocess, wire taps on the sport
request and state topics, nodes spun on a background thread the way the node executables spin
them, a motion node with a probe driving the simulated Go2, a node in its own rclpy context as
launch_ros starts one, the check that a node's shipped parameter file sets exactly what it
declares, and video clips for the camera's file source. Real DDS and rclpy throughout, nothing
mocked. conftest.py builds its ROS fixtures on these (``rclpy_context``, ``ros``, ``spinner``,
``go2_world``, ``motion_rig``); waiting is in polling.py.

The SDK's DDS domain is process-wide, so this process and every sim it starts share one
domain, derived from ROS_DOMAIN_ID (set per run by conftest) and the xdist worker, kept
apart from the ROS domains (1..100).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import rclpy
import yaml
from geometry_msgs.msg import Twist
from nav_msgs.msg import Odometry
from polling import wait_for
from rclpy.node import Node
from rclpy.parameter import Parameter
from speculative_vlm.go2.dds import init_domain
from speculative_vlm.nodes.spin import PoolExecutor
from std_msgs.msg import Bool
from std_srvs.srv import Trigger
from unitree_sdk2py.core.channel import ChannelSubscriber
from unitree_sdk2py.idl.unitree_api.msg.dds_ import Request_
from unitree_sdk2py.idl.unitree_go.msg.dds_ import SportModeState_

from speculative_vlm_msgs.msg import LocomotionCommand

IFACE = "lo"
STOP_MOVE, MOVE = 1003, 1008  # sport request api ids
# Declared by rclpy itself, not by the nodes' code, so no parameter file sets them.
RCLPY_PARAMETERS = ("use_sim_time", "start_type_description_service")


def go2_domain_id() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    return 101 + (int(os.environ["ROS_DOMAIN_ID"]) + 37 * int(worker or 0)) % 120


def join_domain() -> int:
    domain = go2_domain_id()
    init_domain(domain, IFACE)
    return domain


class SimProcess:
    """``speculative-vlm-sim-go2`` running as a child process on the test domain."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "speculative_vlm.go2.sim", "--domain-id", str(go2_domain_id()), "--interface", IFACE, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 30.0
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("ready"):
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.kill()
        raise RuntimeError("simulated Go2 did not start:\n" + "".join(lines))

    def _drain(self) -> None:
        for _ in self.proc.stdout:
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class SportTap:
    """Every sport request seen on the wire (rt/api/sport/request): (monotonic time, api id, parameter)."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, int, str]] = []
        self._lock = threading.Lock()
        self._sub = ChannelSubscriber("rt/api/sport/request", Request_)
        self._sub.Init(self._on_request)

    def _on_request(self, r: Request_) -> None:
        with self._lock:
            self.requests.append((time.monotonic(), int(r.header.identity.api_id), r.parameter))

    def since(self, t0: float, api_id: int | None = None) -> list[tuple[float, int, str]]:
        with self._lock:
            return [r for r in self.requests if r[0] >= t0 and (api_id is None or r[1] == api_id)]

    def moves_since(self, t0: float) -> list[tuple[float, dict]]:
        return [(t, json.loads(p)) for t, _, p in self.since(t0, MOVE)]

    def close(self) -> None:
        self._sub.Close()


class StateTap:
    """The latest rt/sportmodestate, read directly (independent of the node under test)."""

    def __init__(self) -> None:
        self.latest: SportModeState_ | None = None
        self.received = 0
        self._sub = ChannelSubscriber("rt/sportmodestate", SportModeState_)
        self._sub.Init(self._on_state, 10)

    def _on_state(self, m: SportModeState_) -> None:
        self.latest = m
        self.received += 1

    def position(self) -> tuple[float, float]:
        assert self.latest is not None, "no rt/sportmodestate from the simulated Go2"
        return float(self.latest.position[0]), float(self.latest.position[1])

    def speed(self) -> float:
        assert self.latest is not None
        return (self.latest.velocity[0] ** 2 + self.latest.velocity[1] ** 2) ** 0.5

    def close(self) -> None:
        self._sub.Close()


class Spinner:
    """The nodes' executor (:class:`speculative_vlm.nodes.spin.PoolExecutor`) spinning ``nodes``
    on a background thread until :meth:`shutdown`; more nodes can be added while it spins."""

    def __init__(self, *nodes: Node, context=None, num_threads: int | None = None) -> None:
        self.executor = PoolExecutor(num_threads=num_threads, context=context)
        for node in nodes:
            self.executor.add_node(node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # context shut down under us at teardown
            pass

    def add(self, node: Node) -> None:
        self.executor.add_node(node)

    def remove(self, node: Node) -> None:
        self.executor.remove_node(node)

    def shutdown(self, timeout_sec: float = 2.0) -> None:
        self.executor.shutdown(timeout_sec=timeout_sec)


@contextlib.contextmanager
def own_context(args: list[str] | None = None) -> Iterator[rclpy.Context]:
    """An rclpy context of its own (initialised with ``args``), apart from the default one."""
    context = rclpy.Context()
    rclpy.init(args=args, context=context)
    try:
        yield context
    finally:
        rclpy.shutdown(context=context)


@contextlib.contextmanager
def ros_node(name: str, namespace: str, ros_arguments: list[str]) -> Iterator[Node]:
    """A node in its own rclpy context started the way launch_ros starts one (`--ros-args` and
    ``ros_arguments``), declaring whatever parameters it was given."""
    with own_context(["--ros-args", *ros_arguments]) as context:
        node = Node(name, namespace=namespace, context=context, automatically_declare_parameters_from_overrides=True)
        try:
            yield node
        finally:
            node.destroy_node()


def assert_parameter_file_matches(node_class: type[Node], path: Path, node_name: str, **changes) -> None:
    """A ``node_class`` started with the parameter file at ``path`` (its ``node_name`` section, with
    ``changes``) declares exactly the file's parameters, each with a description."""
    params = yaml.safe_load(path.read_text())[node_name]["ros__parameters"]
    assert params, f"{path} sets no parameters"
    params.update(changes)
    node = node_class(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    try:
        declared = {name for name in node._parameters if name not in RCLPY_PARAMETERS}
        assert declared == set(params)
        for name in declared:
            assert node.describe_parameter(name).description, f"{name} has no description"
    finally:
        node.destroy_node()


class MotionRig:
    """A fresh, active motion node in its own namespace plus a probe node talking to it, on the
    simulated Go2 of conftest's ``go2_world`` (conftest's ``motion_rig`` is one, at rest)."""

    RATE = 25.0  # move_rate_hz
    STALE = 0.5  # stale_timeout_s

    def __init__(self, go2_world: dict, **params) -> None:
        from speculative_vlm.nodes.motion import LATCHED, MotionNode

        self.ns = "/t" + uuid.uuid4().hex[:8]
        overrides = {
            "network_interface": "lo",
            "dds_domain_id": go2_world["domain"],
            "move_rate_hz": self.RATE,
            "stale_timeout_s": self.STALE,
            "max_vx": 0.6,
            "diagnostics_period_s": 0.2,
            **params,
        }
        self.node = MotionNode(
            namespace=self.ns, parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()]
        )
        self.probe = Node("probe", namespace=self.ns)
        self.spinner = Spinner()  # one per rig: see test_camera_node
        self.sport: SportTap = go2_world["sport"]
        self.state: StateTap = go2_world["state"]
        self.command = self.probe.create_publisher(LocomotionCommand, "motion/command", 10)
        self.cmd_vel = self.probe.create_publisher(Twist, "cmd_vel", 10)
        self.estop = self.probe.create_publisher(Bool, "motion/estop", LATCHED)
        self.release = self.probe.create_client(Trigger, "motion/release_estop")
        self.engage = self.probe.create_client(Trigger, "motion/engage_estop")
        self.idle: list[bool] = []
        self.active: list[LocomotionCommand] = []
        self.odom: list[Odometry] = []
        self.probe.create_subscription(Bool, "motion/idle", lambda m: self.idle.append(m.data), LATCHED)
        self.probe.create_subscription(LocomotionCommand, "motion/active_command", self.active.append, LATCHED)
        self.probe.create_subscription(Odometry, "odom", self.odom.append, 10)
        self.spinner.add(self.node)
        self.spinner.add(self.probe)
        assert self.node.trigger_configure().name == "SUCCESS"
        assert self.node.trigger_activate().name == "SUCCESS"
        for pub in (self.command, self.cmd_vel, self.estop):
            assert wait_for(lambda pub=pub: pub.get_subscription_count() > 0, 15.0)

    def move(self, vx: float, duration: float, vy: float = 0.0, vyaw: float = 0.0, verified: bool = True) -> float:
        msg = LocomotionCommand(
            action=LocomotionCommand.MOVE, vx=vx, vy=vy, vyaw=vyaw, duration=duration, verified=verified
        )
        msg.header.stamp = self.probe.get_clock().now().to_msg()
        t0 = time.monotonic()
        self.command.publish(msg)
        return t0

    def call(self, client, timeout: float = 5.0) -> Trigger.Response:
        assert client.wait_for_service(timeout_sec=timeout)
        future = client.call_async(Trigger.Request())
        assert wait_for(future.done, timeout)
        return future.result()

    def wait_still(self, timeout: float = 5.0) -> None:
        assert wait_for(lambda: self.state.speed() < 1e-3, timeout), "robot did not come to rest"

    def close(self) -> None:
        self.spinner.shutdown()
        if self.node._backend is not None:
            self.node.trigger_shutdown()
        self.node.destroy_node()
        self.probe.destroy_node()


def write_clip(path: str, frames: int, width: int, height: int, step: int) -> None:
    """An MJPG clip at 10 fps whose frame i is grey level ``step * i``."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (width, height))
    for i in range(frames):
        writer.write(np.full((height, width, 3), step * i, np.uint8))
    writer.release()
