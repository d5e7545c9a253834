"""The motion node when the robot disappears: the simulated Go2 is killed mid-motion."""

from __future__ import annotations

import time
import uuid

import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from go2_harness import SimProcess, Spinner, StateTap, go2_domain_id
from polling import wait_for
from rclpy.node import Node
from rclpy.parameter import Parameter
from speculative_vlm.nodes.motion import MotionNode
from std_srvs.srv import Trigger

from speculative_vlm_msgs.msg import LocomotionCommand

pytestmark = pytest.mark.ros


def test_killing_the_robot_mid_motion_is_reported_in_diagnostics_and_the_node_keeps_running(ros):
    domain = go2_domain_id()
    sim = SimProcess()
    spinner = Spinner()
    state = StateTap()
    ns = "/t" + uuid.uuid4().hex[:8]
    node = MotionNode(
        namespace=ns,
        parameter_overrides=[
            Parameter("dds_domain_id", value=domain),
            Parameter("network_interface", value="lo"),
            Parameter("diagnostics_period_s", value=0.2),
            Parameter("state_timeout_s", value=0.3),
            Parameter("sdk_timeout_s", value=0.2),
        ],
    )
    probe = Node("probe", namespace=ns)
    connection: list[DiagnosticStatus] = []

    def on_diag(array: DiagnosticArray) -> None:
        connection.extend(s for s in array.status if s.name == f"{ns}/motion: Go2 connection" and s.hardware_id.endswith(f"domain{domain}"))

    probe.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    command = probe.create_publisher(LocomotionCommand, "motion/command", 10)
    engage = probe.create_client(Trigger, "motion/engage_estop")
    spinner.add(node)
    spinner.add(probe)
    try:
        assert node.trigger_configure().name == "SUCCESS"
        assert node.trigger_activate().name == "SUCCESS"
        assert wait_for(lambda: command.get_subscription_count() > 0 and state.received > 0, 10.0)
        assert wait_for(lambda: connection and connection[-1].level == DiagnosticStatus.OK, 10.0)

        command.publish(LocomotionCommand(action=LocomotionCommand.MOVE, vx=0.5, duration=4.0, verified=True))
        assert wait_for(lambda: state.speed() > 0.2, 5.0)
        sim.kill()
        t_kill = time.monotonic()

        assert wait_for(lambda: connection[-1].level == DiagnosticStatus.ERROR, 3.0), "robot loss not reported"
        assert "lost" in connection[-1].message
        assert time.monotonic() - t_kill < 3.0
        # Still alive: keeps reporting, keeps answering services, and the Move stream did not die.
        n = len(connection)
        assert wait_for(lambda: len(connection) > n + 2, 2.0)
        assert engage.wait_for_service(timeout_sec=2.0)
        future = engage.call_async(Trigger.Request())
        assert wait_for(future.done, 3.0) and future.result().success
        assert node._loop is not None and node._loop.is_alive()
    finally:
        sim.kill()
        spinner.remove(node)
        spinner.remove(probe)
        node.trigger_shutdown()
        node.destroy_node()
        probe.destroy_node()
        state.close()
        spinner.shutdown()
