"""The Foxglove view, seen by a WebSocket client speaking the Foxglove protocol (foxglove.sdk.v1):
every channel is advertised with the right schema, and a client that subscribes to each receives
messages carrying what the ROS graph published."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import struct
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
import websockets
import yaml
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from go2_harness import Spinner, own_context
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from speculative_vlm.go2.scene import load_scene
from speculative_vlm.nodes.foxglove_view import FoxgloveViewError, FoxgloveViewNode, start_for_bringup
from speculative_vlm.nodes.image_conversion import numpy_to_image
from std_msgs.msg import Bool, String

from speculative_vlm_msgs.msg import DecodingStats, LocomotionCommand

pytestmark = pytest.mark.ros

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
SUBPROTOCOLS = ["foxglove.sdk.v1", "foxglove.websocket.v1"]  # as the Foxglove app offers them
MESSAGE_DATA = 0x01  # binary opcode: subscription id (u32), log time (u64), payload


def expected_channels(ns: str) -> dict[str, str]:
    return {
        f"{ns}/camera/image_raw/compressed": "foxglove.CompressedImage",
        f"{ns}/monitor/image/compressed": "foxglove.CompressedImage",
        f"{ns}/tf": "foxglove.FrameTransform",
        f"{ns}/odom/pose": "foxglove.PoseInFrame",
        f"{ns}/odom/path": "foxglove.PosesInFrame",
        f"{ns}/scene": "foxglove.SceneUpdate",
        f"{ns}/motion/command": "speculative_vlm_msgs/msg/LocomotionCommand",
        f"{ns}/motion/active_command": "speculative_vlm_msgs/msg/LocomotionCommand",
        f"{ns}/drafter/stats": "speculative_vlm_msgs/msg/DecodingStats",
        f"{ns}/bridge/link": "std_msgs/msg/String",
        f"{ns}/motion/estop_engaged": "std_msgs/msg/Bool",
        "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
        "/rosout": "foxglove.Log",
    }


class Graph:
    """A Foxglove view and a publisher of every topic it reads, in one rclpy context."""

    def __init__(self, **view_parameters) -> None:
        self.ns = "/fx" + uuid.uuid4().hex[:8]
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        overrides = [Parameter("port", value=0), Parameter("scene", value="default"),
                     Parameter("image_max_rate_hz", value=60.0), Parameter("pose_max_rate_hz", value=100.0)]
        overrides += [Parameter(k, value=v) for k, v in view_parameters.items()]
        self.view = FoxgloveViewNode(context=self.context, namespace=self.ns, parameter_overrides=overrides)
        self.probe = Node("probe", namespace=self.ns, context=self.context)
        self.spinner = Spinner(self.view, self.probe, context=self.context)
        pub = self.probe.create_publisher
        self.pubs = {
            "image": pub(Image, "camera/image_raw", qos_profile_sensor_data),
            "compressed": pub(CompressedImage, "camera/image_raw/compressed", qos_profile_sensor_data),
            "monitor": pub(Image, "monitor/image", QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE)),
            "odom": pub(Odometry, "odom", 10),
            "command": pub(LocomotionCommand, "motion/command", 10),
            "active": pub(LocomotionCommand, "motion/active_command", LATCHED),
            "stats": pub(DecodingStats, "drafter/stats", 10),
            "link": pub(String, "bridge/link", LATCHED),
            "estop": pub(Bool, "motion/estop_engaged", LATCHED),
            "diagnostics": pub(DiagnosticArray, "/diagnostics", 10),
        }
        self.odom_x = 0.0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.view.port}"

    def publish_latched_state(self) -> None:
        self.pubs["link"].publish(String(data="UP"))
        self.pubs["estop"].publish(Bool(data=True))
        self.pubs["active"].publish(LocomotionCommand(action=LocomotionCommand.MOVE, vx=0.3, duration=1.0))

    def publish_stream(self, with_raw_camera: bool = True) -> None:
        """One round of every streaming topic (called repeatedly: publishers need discovery)."""
        frame = numpy_to_image(np.full((48, 64, 3), (10, 120, 230), np.uint8), "bgr8")
        frame.header.frame_id = "camera"
        if with_raw_camera:
            self.pubs["image"].publish(frame)
        self.pubs["monitor"].publish(frame)
        self.odom_x += 0.1
        odom = Odometry()
        odom.header.frame_id, odom.child_frame_id = "odom", "base_link"
        odom.pose.pose.position.x, odom.pose.pose.orientation.w = self.odom_x, 1.0
        self.pubs["odom"].publish(odom)
        self.pubs["command"].publish(LocomotionCommand(action=LocomotionCommand.MOVE, vx=0.5, duration=2.0,
                                                       verified=True, text='{"action": "move"}'))
        self.pubs["stats"].publish(DecodingStats(rounds=3, acceptance_rate=0.75))
        self.pubs["diagnostics"].publish(DiagnosticArray(status=[
            DiagnosticStatus(level=DiagnosticStatus.OK, name="probe: test", message="fine")]))
        self.probe.get_logger().info("hello foxglove")

    def close(self) -> None:
        self.spinner.shutdown()
        self.view.destroy_node()
        self.probe.destroy_node()
        rclpy.shutdown(context=self.context)


@contextlib.contextmanager
def graph(**view_parameters):
    g = Graph(**view_parameters)
    try:
        yield g
    finally:
        g.close()


def decode_protobuf(channel: dict, payload: bytes):
    """A foxglove.* message decoded with the FileDescriptorSet the server advertised."""
    files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(channel["schema"]))
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(channel["schemaName"])).FromString(payload)


async def _watch(url: str, until, feed, timeout_s: float) -> tuple[dict[str, dict], dict[str, list[bytes]]]:
    """Connect, subscribe to every advertised channel, collect payloads by topic until `until(received)`."""
    channels: dict[int, dict] = {}
    received: dict[str, list[bytes]] = {}
    async with websockets.connect(url, subprotocols=SUBPROTOCOLS, max_size=None) as ws:
        assert ws.subprotocol == "foxglove.sdk.v1"
        deadline = time.monotonic() + timeout_s
        subscribed: dict[int, dict] = {}
        fed = 0.0
        while time.monotonic() < deadline and not until(received):
            if time.monotonic() - fed > 0.05:  # about 20 rounds a second, however fast frames come
                fed = time.monotonic()
                feed()
            try:
                frame = await asyncio.wait_for(ws.recv(), 0.1)
            except TimeoutError:
                continue
            if isinstance(frame, str):
                message = json.loads(frame)
                if message["op"] == "advertise":
                    new = [c for c in message["channels"] if c["id"] not in channels]
                    channels.update({c["id"]: c for c in new})
                    subs = [{"id": 100 + c["id"], "channelId": c["id"]} for c in new]
                    subscribed.update({100 + c["id"]: c for c in new})
                    await ws.send(json.dumps({"op": "subscribe", "subscriptions": subs}))
                continue
            opcode, sub_id, _log_time = struct.unpack_from("<BIQ", frame, 0)
            assert opcode == MESSAGE_DATA
            received.setdefault(subscribed[sub_id]["topic"], []).append(bytes(frame[13:]))
    return {c["topic"]: c for c in channels.values()}, received


def watch(url: str, until, feed=lambda: None, timeout_s: float = 20.0):
    return asyncio.run(_watch(url, until, feed, timeout_s))


def test_every_channel_is_advertised_with_its_schema_and_delivers_a_message():
    with graph() as g:
        g.publish_latched_state()
        expected = expected_channels(g.ns)
        channels, received = watch(g.url, lambda r: set(expected) <= set(r), g.publish_stream)
        assert {topic: c["schemaName"] for topic, c in channels.items()} == expected
        missing = sorted(set(expected) - set(received))
        assert not missing, f"no message on {missing}"


def test_the_camera_frame_is_encoded_as_jpeg_when_the_camera_sends_no_compressed_image():
    with graph() as g:
        topic = f"{g.ns}/camera/image_raw/compressed"
        channels, received = watch(g.url, lambda r: topic in r, g.publish_stream)
        image = decode_protobuf(channels[topic], received[topic][0])
        assert image.format == "jpeg" and image.frame_id == "camera"
        pixels = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_COLOR)
        assert pixels.shape == (48, 64, 3) and np.abs(pixels[24, 32].astype(int) - (10, 120, 230)).max() < 12


def test_the_cameras_own_jpeg_is_passed_through_unchanged():
    jpeg = cv2.imencode(".jpg", np.full((30, 40, 3), 200, np.uint8))[1].tobytes()

    def feed() -> None:
        g.publish_stream(with_raw_camera=False)
        g.pubs["compressed"].publish(CompressedImage(format="jpeg", data=jpeg))

    with graph() as g:
        topic = f"{g.ns}/camera/image_raw/compressed"
        channels, received = watch(g.url, lambda r: topic in r, feed)
        image = decode_protobuf(channels[topic], received[topic][0])
        assert image.format == "jpeg" and image.data == jpeg


def test_ros_messages_arrive_as_cdr_that_decodes_to_what_was_published():
    with graph() as g:
        g.publish_latched_state()
        topics = {f"{g.ns}/motion/command", f"{g.ns}/drafter/stats", f"{g.ns}/bridge/link", "/diagnostics"}
        channels, received = watch(g.url, lambda r: topics <= set(r), g.publish_stream)
        assert all(channels[t]["encoding"] == "cdr" and channels[t]["schemaEncoding"] == "ros2msg" for t in topics)
        assert "float32 acceptance_rate" in channels[f"{g.ns}/drafter/stats"]["schema"]  # the ros2msg text
        command = deserialize_message(received[f"{g.ns}/motion/command"][0], LocomotionCommand)
        assert command.vx == pytest.approx(0.5) and command.verified
        assert deserialize_message(received[f"{g.ns}/drafter/stats"][0], DecodingStats).rounds == 3
        assert deserialize_message(received[f"{g.ns}/bridge/link"][0], String).data == "UP"
        status = deserialize_message(received["/diagnostics"][0], DiagnosticArray).status
        assert status[0].name == "probe: test"


def test_a_client_that_connects_late_still_gets_the_scene_link_and_estop_state():
    with graph() as g:
        g.publish_latched_state()
        time.sleep(1.0)  # the view has the state long before anyone connects
        topics = {f"{g.ns}/scene", f"{g.ns}/bridge/link", f"{g.ns}/motion/estop_engaged",
                  f"{g.ns}/motion/active_command"}
        channels, received = watch(g.url, lambda r: topics <= set(r))  # nothing is published while watching
        assert deserialize_message(received[f"{g.ns}/motion/estop_engaged"][0], Bool).data is True
        scene = decode_protobuf(channels[f"{g.ns}/scene"], received[f"{g.ns}/scene"][0])
        ids = {entity.id for entity in scene.entities}
        assert {"room", "robot"} | {obj.name for obj in load_scene(None).objects} <= ids
        ball = next(e for e in scene.entities if e.id == "the red ball")
        assert ball.frame_id == "odom" and ball.spheres[0].pose.position.x == pytest.approx(3.0)


def test_the_pose_path_and_logs_follow_the_graph():
    with graph() as g:
        path_topic = f"{g.ns}/odom/path"
        topics = {f"{g.ns}/odom/pose", path_topic, f"{g.ns}/tf", "/rosout"}

        def logged(r) -> bool:
            return topics <= set(r) and any(b"hello foxglove" in m for m in r["/rosout"]) and len(r[path_topic]) >= 2

        channels, received = watch(g.url, logged, g.publish_stream)
        pose = decode_protobuf(channels[f"{g.ns}/odom/pose"], received[f"{g.ns}/odom/pose"][-1])
        assert pose.frame_id == "odom" and pose.pose.position.x > 0
        tf = decode_protobuf(channels[f"{g.ns}/tf"], received[f"{g.ns}/tf"][-1])
        assert (tf.parent_frame_id, tf.child_frame_id) == ("odom", "base_link")
        path = decode_protobuf(channels[path_topic], received[path_topic][-1])
        assert len(path.poses) >= 2 and path.poses[-1].position.x > path.poses[0].position.x
        log = next(decode_protobuf(channels["/rosout"], m) for m in received["/rosout"] if b"hello foxglove" in m)
        assert log.message == "hello foxglove" and log.name.endswith("probe") and log.level == 2  # INFO


def test_a_port_in_use_is_refused_with_what_to_do():
    with graph() as g, own_context() as context:
        with pytest.raises(FoxgloveViewError, match="port"):
            FoxgloveViewNode(context=context, parameter_overrides=[Parameter("port", value=g.view.port)])


def test_start_only_parameters_are_read_only():
    with graph() as g:
        result = g.view.set_parameters([Parameter("port", value=9999)])[0]
        assert not result.successful and g.view.get_parameter("port").value == 0
        assert g.view.set_parameters([Parameter("jpeg_quality", value=50)])[0].successful


def bringup_sections(config: str, port: int = 0) -> dict:
    sections = yaml.safe_load((CONFIG_DIR / config).read_text())
    sections["foxglove"]["ros__parameters"]["port"] = port
    return sections


@contextlib.contextmanager
def bringup_rclpy(sections: dict, tmp_path):
    """rclpy as `speculative-vlm up` initialises it: the config as the global params file."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(sections))
    rclpy.init(args=["--ros-args", "--params-file", str(path)])
    try:
        yield
    finally:
        rclpy.shutdown()


def test_the_sim_config_serves_the_view_and_the_robot_config_does_not():
    sim = yaml.safe_load((CONFIG_DIR / "sim.yaml").read_text())["foxglove"]["ros__parameters"]
    robot = yaml.safe_load((CONFIG_DIR / "robot.yaml").read_text())["foxglove"]["ros__parameters"]
    assert sim["enabled"] is True and robot["enabled"] is False
    assert sim["host"] == robot["host"] == "127.0.0.1" and sim["port"] == robot["port"] == 8765


def test_the_bringup_starts_the_view_with_the_sim_scene_when_enabled(tmp_path, capsys):
    with bringup_rclpy(bringup_sections("sim.yaml"), tmp_path):
        view = start_for_bringup(bringup_sections("sim.yaml"))
        try:
            assert view is not None and view.port > 0
            assert view.get_parameter("scene").value == "default"
            assert f"ws://127.0.0.1:{view.port}" in capsys.readouterr().out
        finally:
            view.destroy_node()


def test_the_bringup_starts_no_view_when_disabled(tmp_path):
    with bringup_rclpy(bringup_sections("robot.yaml"), tmp_path):
        assert start_for_bringup(bringup_sections("robot.yaml")) is None


def test_the_bringup_goes_on_without_the_view_when_its_port_is_taken(tmp_path, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        sections = bringup_sections("sim.yaml", port=holder.getsockname()[1])
        with bringup_rclpy(sections, tmp_path):
            assert start_for_bringup(sections) is None
    assert "cannot serve on 127.0.0.1" in capsys.readouterr().out
