"""The monitor node, run as its own process, annotates camera frames and marks the
commanded velocity for rviz, over a real DDS graph."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from speculative_vlm.nodes.image_conversion import image_to_numpy, numpy_to_image
from std_msgs.msg import String
from visualization_msgs.msg import Marker

from speculative_vlm_msgs.msg import DecodingStats, LocomotionCommand

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def monitor_process():
    proc = subprocess.Popen([sys.executable, "-m", "speculative_vlm.nodes.monitor", "--ros-args",
                             "-r", "__ns:=/mon", "-p", "diagnostics_period_s:=0.2", "-p", "stale_after_s:=0.5"], env=os.environ.copy())
    yield proc
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def node(monitor_process, rclpy_context):
    n = Node("test_monitor", namespace="/mon")
    yield n
    n.destroy_node()


def collect(node: Node, msg_type, topic: str, qos, until, feed=None, timeout: float = 20.0) -> list:
    """Spin until `until(received)` holds, calling `feed()` each round (publishers need discovery)."""
    received: list = []
    sub = node.create_subscription(msg_type, topic, received.append, qos)
    deadline = time.monotonic() + timeout
    try:
        while not until(received) and time.monotonic() < deadline:
            if feed is not None:
                feed()
            rclpy.spin_once(node, timeout_sec=0.1)
    finally:
        node.destroy_subscription(sub)
    assert until(received), f"nothing suitable on {topic} within {timeout} s (got {len(received)})"
    return received


def frame(width: int = 320, height: int = 240, encoding: str = "rgb8") -> Image:
    rng = np.random.default_rng(7)
    array = rng.integers(60, 200, size=(height, width, 3), dtype=np.uint8)
    msg = numpy_to_image(array, encoding)
    msg.header.frame_id = "front_camera"
    msg.header.stamp.sec = 42
    return msg


def move(vx: float, vy: float, vyaw: float = 0.0) -> LocomotionCommand:
    return LocomotionCommand(action=LocomotionCommand.MOVE, vx=vx, vy=vy, vyaw=vyaw, duration=2.0, verified=True,
                             text='{"action": "move", "vx": 0.5}')


def test_annotated_image_keeps_size_and_stamp_and_shows_the_command(node):
    image_pub = node.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
    command_pub = node.create_publisher(LocomotionCommand, "motion/active_command", 10)
    stats_pub = node.create_publisher(DecodingStats, "drafter/stats", 10)
    text_pub = node.create_publisher(String, "drafter/text", 10)
    sent = frame()

    def feed() -> None:
        command_pub.publish(move(0.5, 0.1, 0.3))
        stats_pub.publish(DecodingStats(acceptance_rate=0.75, tokens_per_pass=3.5, tokens_per_second=20.0))
        text_pub.publish(String(data='{"action": "move", "vx": 0.5, "vy": 0.1'))
        image_pub.publish(sent)

    # Wait for an image drawn after the command arrived (the first ones may predate it).
    images = collect(node, Image, "monitor/image", 10, lambda r: len(r) >= 3, feed)
    out = images[-1]
    assert (out.width, out.height, out.encoding) == (sent.width, sent.height, "bgr8")
    assert out.header.stamp.sec == 42 and out.header.frame_id == "front_camera"
    original_bgr = image_to_numpy(sent)[:, :, ::-1]
    changed = np.any(image_to_numpy(out) != original_bgr, axis=2)
    assert changed.mean() > 0.01, "the annotations should cover a visible part of the frame"
    assert changed.mean() < 0.5, "the camera frame should still be visible under the annotations"


def test_velocity_marker_points_along_the_commanded_velocity_at_the_odometry_pose(node):
    command_pub = node.create_publisher(LocomotionCommand, "motion/active_command", 10)
    odom_pub = node.create_publisher(Odometry, "odom", 10)
    odom = Odometry()
    odom.header.frame_id = "odom"
    odom.pose.pose.position.x, odom.pose.pose.position.y = 1.5, -0.5
    odom.pose.pose.orientation.z, odom.pose.pose.orientation.w = math.sin(math.pi / 4), math.cos(math.pi / 4)

    def feed() -> None:
        odom_pub.publish(odom)
        command_pub.publish(move(0.4, 0.4))

    # Earlier tests' commands may still be the monitor's latest when the first odometry arrives:
    # wait for a marker drawn from this command (its length is the commanded speed).
    def this_command(m: Marker) -> bool:
        return m.header.frame_id == "odom" and m.scale.x == pytest.approx(math.hypot(0.4, 0.4), rel=1e-3)

    markers = collect(node, Marker, "monitor/velocity_marker", 10, lambda r: any(this_command(m) for m in r), feed)
    marker = [m for m in markers if this_command(m)][-1]
    assert (marker.type, marker.action) == (Marker.ARROW, Marker.ADD)
    assert (marker.pose.position.x, marker.pose.position.y) == (1.5, -0.5)
    yaw = 2 * math.atan2(marker.pose.orientation.z, marker.pose.orientation.w)
    assert yaw == pytest.approx(math.pi / 2 + math.pi / 4, abs=1e-3)  # robot facing +y, moving forward-left
    assert marker.scale.x == pytest.approx(math.hypot(0.4, 0.4), rel=1e-3)


def test_a_stop_command_deletes_the_velocity_marker(node):
    command_pub = node.create_publisher(LocomotionCommand, "motion/active_command", 10)
    markers = collect(node, Marker, "monitor/velocity_marker", 10, lambda r: len(r) >= 1,
                      lambda: command_pub.publish(LocomotionCommand(action=LocomotionCommand.STOP)))
    assert markers[-1].action == Marker.DELETE


def test_diagnostics_warn_when_the_camera_stops(node):
    # No frame has been sent for longer than stale_after_s (0.5 s) by now.
    def camera_stale(arrays: list) -> bool:
        return any(s.level == DiagnosticStatus.WARN and "image" in s.message for a in arrays for s in a.status)

    arrays = collect(node, DiagnosticArray, "/diagnostics", 10, camera_stale)
    status = next(s for a in arrays for s in a.status if s.level == DiagnosticStatus.WARN)
    assert status.name == "/mon/monitor: inputs"
    assert {"image age s", "command age s", "odom age s"} <= {kv.key for kv in status.values}


def test_velocity_marker_follows_the_robot_between_commands(node):
    command_pub = node.create_publisher(LocomotionCommand, "motion/active_command", 10)
    odom_pub = node.create_publisher(Odometry, "odom", 10)
    collect(node, Marker, "monitor/velocity_marker", 10, lambda r: any(m.action == Marker.ADD for m in r),
            lambda: command_pub.publish(move(0.5, 0.0)))
    moved = Odometry()
    moved.header.frame_id = "odom"
    moved.pose.pose.position.x = 3.25
    moved.pose.pose.orientation.w = 1.0
    # Only odometry from here on: the marker must still move to the new pose.
    markers = collect(node, Marker, "monitor/velocity_marker", 10,
                      lambda r: any(m.pose.position.x == 3.25 for m in r), lambda: odom_pub.publish(moved))
    assert markers[-1].action == Marker.ADD and markers[-1].header.frame_id == "odom"
