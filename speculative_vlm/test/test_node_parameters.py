"""Parameters as ``ros2 param set`` sees them: start-only ones are refused, run-time ones take effect.

Every change goes through the node's real ``<node>/set_parameters`` service, called from a
separate client node over DDS, as ``ros2 param set`` does.
"""

from __future__ import annotations

import time
import uuid

import pytest
from go2_harness import SimProcess, Spinner, SportTap, StateTap, join_domain, write_clip
from polling import wait_for
from rcl_interfaces.msg import SetParametersResult
from rcl_interfaces.srv import SetParameters
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from speculative_vlm_msgs.msg import LocomotionCommand

pytestmark = pytest.mark.ros

# What may only be set at start, per node: models, addresses, perception, sources, topics,
# interfaces, frames, TLS and token sources, and the safety policies.
READ_ONLY = {
    "camera": {"source", "frame_id", "input_topic", "video_path", "loop_video", "network_interface",
               "dds_domain_id", "sdk_timeout_s", "base_frame", "mount_x", "mount_y", "mount_z", "mount_roll",
               "mount_pitch", "mount_yaw"},
    "motion": {"network_interface", "dds_domain_id", "sdk_timeout_s", "odom_frame", "base_frame",
               "require_verified", "publish_tf", "autostart"},
    "bridge": {"cloud_address", "fallback_addresses", "auth_token_env", "auth_token_file", "tls_ca", "tls_cert",
               "tls_key"},
    "monitor": {"image_topic", "text_topic", "command_topic", "stats_topic", "odom_topic", "base_frame"},
    "drafter": {"draft_model", "draft_device", "draft_dtype", "perception", "draft_perception", "grammar",
                "on_link_lost",
                "execute_unverified", "torch_threads", "image_topic"},
}


def make_node(name: str, namespace: str, **params):
    from speculative_vlm.nodes.bridge import BridgeNode
    from speculative_vlm.nodes.camera import CameraNode
    from speculative_vlm.nodes.drafter import DrafterNode
    from speculative_vlm.nodes.monitor import MonitorNode
    from speculative_vlm.nodes.motion import MotionNode

    defaults = {
        "camera": {"source": "topic"},  # no robot needed to construct it
        "drafter": {"draft_model": "/nonexistent/draft"},  # fails to load, in the background: irrelevant here
    }
    cls = {"camera": CameraNode, "motion": MotionNode, "bridge": BridgeNode, "monitor": MonitorNode,
           "drafter": DrafterNode}[name]
    overrides = [Parameter(k, value=v) for k, v in {**defaults.get(name, {}), **params}.items()]
    return cls(namespace=namespace, parameter_overrides=overrides)


def set_through_service(client_node: Node, node_name: str, *params: Parameter) -> list[SetParametersResult]:
    """What ``ros2 param set`` does: call <node>/set_parameters from another node."""
    client = client_node.create_client(SetParameters, f"{node_name}/set_parameters")
    try:
        assert client.wait_for_service(timeout_sec=15.0), f"no {node_name}/set_parameters service"
        future = client.call_async(SetParameters.Request(parameters=[p.to_parameter_msg() for p in params]))
        assert wait_for(future.done, 10.0), "set_parameters did not answer"
        return list(future.result().results)
    finally:
        client_node.destroy_client(client)


@pytest.mark.parametrize("name", sorted(READ_ONLY))
def test_exactly_the_start_only_parameters_are_read_only(ros, name):
    node = make_node(name, "/t" + uuid.uuid4().hex[:8])
    try:
        declared = {n for n in node._parameters if n not in ("use_sim_time", "start_type_description_service")}
        read_only = {n for n in declared if node.describe_parameter(n).read_only}
        assert read_only == READ_ONLY[name]
    finally:
        node.destroy_node()


@pytest.mark.parametrize(("name", "param", "value"), [
    ("camera", "source", "file"),
    ("motion", "network_interface", "eth0"),
    ("bridge", "cloud_address", "10.0.0.1:50561"),
    ("monitor", "image_topic", "other/image"),
    ("drafter", "draft_model", "another-draft"),
    ("drafter", "draft_dtype", "bfloat16"),
])
def test_ros2_param_set_on_a_start_only_parameter_is_refused_and_changes_nothing(ros, name, param, value):
    ns = "/t" + uuid.uuid4().hex[:8]
    node = make_node(name, ns)
    client = Node("param_client", namespace=ns)
    spinner = Spinner()
    spinner.add(node)
    spinner.add(client)
    before = node.get_parameter(param).value
    try:
        [result] = set_through_service(client, name, Parameter(param, value=value))
        assert not result.successful
        assert "read-only" in result.reason and param in result.reason
        assert node.get_parameter(param).value == before
    finally:
        spinner.shutdown()
        node.destroy_node()
        client.destroy_node()


@pytest.mark.parametrize(("param", "value", "says"), [("draft_dtype", "fp8", "dtype 'fp8' is not supported"),
                                                   ("draft_device", "tpu", "use cpu, cuda or cuda:N")])
def test_a_draft_device_or_dtype_that_does_not_exist_is_refused_at_start(ros, param, value, says):
    with pytest.raises(ValueError, match=f"draft_device/draft_dtype: .*{says}"):
        make_node("drafter", "/t" + uuid.uuid4().hex[:8], **{param: value})


def test_max_vx_set_at_run_time_limits_the_next_command(ros):
    sim = SimProcess()
    sport, state = SportTap(), StateTap()
    ns = "/t" + uuid.uuid4().hex[:8]
    node = make_node("motion", ns, dds_domain_id=join_domain(), network_interface="lo", max_vx=0.6)
    client = Node("param_client", namespace=ns)
    command = client.create_publisher(LocomotionCommand, "motion/command", 10)
    spinner = Spinner()
    spinner.add(node)
    spinner.add(client)
    try:
        assert node.trigger_configure().name == "SUCCESS" and node.trigger_activate().name == "SUCCESS"
        assert wait_for(lambda: command.get_subscription_count() > 0 and state.received > 0, 15.0)
        [result] = set_through_service(client, "motion", Parameter("max_vx", value=0.2))
        assert result.successful, result.reason
        t0 = time.monotonic()
        command.publish(LocomotionCommand(action=LocomotionCommand.MOVE, vx=0.5, duration=0.5, verified=True))
        assert wait_for(lambda: sport.moves_since(t0), 5.0), "no Move"
        assert {m["x"] for _, m in sport.moves_since(t0)} == {0.2}
    finally:
        spinner.shutdown()
        node.trigger_shutdown()
        node.destroy_node()
        client.destroy_node()
        sport.close()
        state.close()
        sim.stop()


def test_camera_rate_set_at_run_time_changes_the_frame_rate(ros, tmp_path):
    path = str(tmp_path / "clip.avi")
    write_clip(path, frames=10, width=32, height=24, step=20)
    ns = "/t" + uuid.uuid4().hex[:8]
    node = make_node("camera", ns, source="file", video_path=path, rate_hz=20.0)
    client = Node("param_client", namespace=ns)
    stamps: list[float] = []
    client.create_subscription(Image, "camera/image_raw", lambda _m: stamps.append(time.monotonic()),
                               qos_profile_sensor_data)
    spinner = Spinner()
    spinner.add(node)
    spinner.add(client)

    def rate_over(seconds: float) -> float:
        time.sleep(0.3)  # let a rate change settle
        t0 = time.monotonic()
        time.sleep(seconds)
        return len([t for t in stamps if t >= t0]) / seconds

    try:
        assert wait_for(lambda: len(stamps) > 3, 15.0), "no frames"
        fast = rate_over(1.0)
        [result] = set_through_service(client, "camera", Parameter("rate_hz", value=4.0))
        assert result.successful, result.reason
        slow = rate_over(1.5)
        assert fast > 14.0, f"{fast:.1f} frames/s at 20 Hz"
        assert 2.5 <= slow <= 5.5, f"{slow:.1f} frames/s after rate_hz was set to 4"
    finally:
        spinner.shutdown()
        node.destroy_node()
        client.destroy_node()
