"""Diagnostics and logs as an operator sees them: status names that say which robot's node they
come from, and the reason for a lost cloud link on /rosout."""

from __future__ import annotations

import socket
import uuid

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from go2_harness import Spinner
from polling import wait_for
from rcl_interfaces.msg import Log
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

pytestmark = pytest.mark.ros


def test_two_namespaced_cameras_publish_statuses_that_do_not_collide(ros):
    from speculative_vlm.nodes.camera import CameraNode

    tag = uuid.uuid4().hex[:8]
    namespaces = (f"/robot1_{tag}", f"/robot2_{tag}")
    cameras = [CameraNode(namespace=ns, parameter_overrides=[
        Parameter("source", value="topic"), Parameter("diagnostics_period_s", value=0.2)]) for ns in namespaces]
    probe = Node("diagnostics_probe")
    names: set[str] = set()
    probe.create_subscription(DiagnosticArray, "/diagnostics",
                              lambda a: names.update(s.name for s in a.status if tag in s.name), 10)
    spinner = Spinner()
    for node in (*cameras, probe):
        spinner.add(node)
    try:
        assert wait_for(lambda: len(names) >= 2, 10.0), f"statuses seen: {names}"
        assert names == {f"{ns}/camera: frames" for ns in namespaces}
    finally:
        spinner.shutdown()
        for node in (*cameras, probe):
            node.destroy_node()


def test_the_reason_for_a_lost_cloud_link_reaches_rosout(ros):
    from speculative_vlm.nodes.bridge import BridgeNode

    with socket.socket() as s:  # a port with nothing behind it: the verifier is unreachable
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    ns = "/t" + uuid.uuid4().hex[:8]
    logs: list[Log] = []
    probe = Node("rosout_probe")
    # /rosout keeps its recent history (transient local): nothing is missed while the probe matches.
    history = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    probe.create_subscription(Log, "/rosout", logs.append, history)
    bridge = BridgeNode(namespace=ns, parameter_overrides=[Parameter("cloud_address", value=address)])
    spinner = Spinner()
    spinner.add(bridge)
    spinner.add(probe)

    def lost() -> list[Log]:
        return [m for m in logs if m.name == f"{ns[1:]}.bridge" and "LOST" in m.msg]

    try:
        assert wait_for(lambda: lost(), 20.0), f"no link-lost log from the bridge; got {[m.msg for m in logs][-5:]}"
        [first, *_] = lost()
        assert first.level == Log.ERROR
        assert address in first.msg and "cannot reach" in first.msg  # the reason, not only the state
    finally:
        spinner.shutdown()
        bridge.destroy_node()
        probe.destroy_node()
