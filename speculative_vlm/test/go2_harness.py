"""Test support for the Go2 side: the simulated Go2 in a subprocess, a wire tap on the sport
request topic, an rclpy executor thread, a node in its own rclpy context, and video clips for
the camera's file source. Real DDS throughout, nothing mocked.

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
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import rclpy
from rclpy.node import Node
from speculative_vlm.go2.dds import init_domain
from speculative_vlm.nodes.spin import PoolExecutor
from unitree_sdk2py.core.channel import ChannelSubscriber
from unitree_sdk2py.idl.unitree_api.msg.dds_ import Request_
from unitree_sdk2py.idl.unitree_go.msg.dds_ import SportModeState_

IFACE = "lo"


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
        return [(t, json.loads(p)) for t, _, p in self.since(t0, 1008)]

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
    """The nodes' executor (see speculative_vlm.nodes.spin) on a background thread."""

    def __init__(self) -> None:
        self.executor = PoolExecutor(num_threads=2)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # context shut down under us at teardown
            pass

    def add(self, node) -> None:
        self.executor.add_node(node)

    def remove(self, node) -> None:
        self.executor.remove_node(node)

    def shutdown(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def init_rclpy() -> None:
    if not rclpy.ok():
        rclpy.init()


@contextlib.contextmanager
def ros_node(name: str, namespace: str, ros_arguments: list[str]) -> Iterator[Node]:
    """A node in its own rclpy context started the way launch_ros starts one (`--ros-args` and
    ``ros_arguments``), declaring whatever parameters it was given."""
    context = rclpy.Context()
    rclpy.init(args=["--ros-args", *ros_arguments], context=context)
    node = Node(name, namespace=namespace, context=context, automatically_declare_parameters_from_overrides=True)
    try:
        yield node
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


def write_clip(path: str, frames: int, width: int, height: int, step: int) -> None:
    """An MJPG clip at 10 fps whose frame i is grey level ``step * i``."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (width, height))
    for i in range(frames):
        writer.write(np.full((height, width, 3), step * i, np.uint8))
    writer.release()
