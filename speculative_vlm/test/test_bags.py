"""Bags: `speculative-vlm record` writes real rosbag2 MCAP bags and `replay` plays them, and
bags written the way `ros2 bag record` writes them, with /clock and the recorded timing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ament_index_python.packages import get_package_share_directory
from polling import wait_for, wait_until
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosbags.highlevel import AnyReader
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from speculative_vlm.bags import BagPlayer, BagRecorder, installed_typestore

from speculative_vlm_msgs.msg import LocomotionCommand

IMAGE_TOPIC = "/camera/image_raw"
COMMAND_TOPIC = "/motion/command"
SPACING_S = 0.15  # between published messages while recording
FRAMES = 6
# Like a camera subscriber (best effort), with room for every frame even if this process stalls.
CAMERA_SUB_QOS = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT)


def image(i: int) -> Image:
    msg = Image(height=3, width=4, encoding="rgb8", step=12)
    msg.header.frame_id = "camera"
    msg.header.stamp.sec = 100 + i
    msg.data = bytes((i * 7 + k) % 256 for k in range(36))
    return msg


def command(i: int) -> LocomotionCommand:
    return LocomotionCommand(action=LocomotionCommand.MOVE, vx=0.125 * i, vyaw=-0.0625 * i, duration=1.0 + i,
                             verified=True, text=f"step {i}")


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "speculative_vlm.cli", *args], env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Inbox:
    """Messages received on one topic with their monotonic arrival times."""

    def __init__(self) -> None:
        self.items: list[tuple[float, object]] = []

    def __call__(self, msg: object) -> None:
        self.items.append((time.monotonic(), msg))

    @property
    def messages(self) -> list:
        return [m for _, m in self.items]

    def wait_for(self, count: int, timeout: float) -> None:
        """Wait until ``count`` messages have come (or ``timeout`` s); the test then checks what came."""
        wait_for(lambda: len(self.items) >= count, timeout, step=0.02)


@pytest.fixture
def node(rclpy_context, spinner, request):
    """A test node, named after the test, spun in the background."""
    probe = Node("test_bags_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_"))
    spinner.add(probe)
    yield probe
    spinner.remove(probe)
    probe.destroy_node()


@pytest.fixture(scope="module")
def recorded_bag(rclpy_context, tmp_path_factory) -> Path:
    """A bag recorded by `speculative-vlm record` (another process) from this process's publishers."""
    path = tmp_path_factory.mktemp("rec") / "bag"
    recorder = cli("record", "-o", str(path), IMAGE_TOPIC, COMMAND_TOPIC)
    node = Node("test_bags_publisher")
    images = node.create_publisher(Image, IMAGE_TOPIC, qos_profile_sensor_data)
    commands = node.create_publisher(LocomotionCommand, COMMAND_TOPIC, 10)
    try:
        wait_until(lambda: images.get_subscription_count() and commands.get_subscription_count(), 30,
                   "the recorder to subscribe")
        time.sleep(0.3)  # let both directions of discovery settle before the first message
        for i in range(FRAMES):
            images.publish(image(i))
            commands.publish(command(i))
            time.sleep(SPACING_S)
        time.sleep(0.5)
    finally:
        recorder.send_signal(signal.SIGINT)
        out, _ = recorder.communicate(timeout=20)
        node.destroy_node()
    assert recorder.returncode == 0, out
    return path


def test_installed_definitions_hash_like_the_ros_build(rclpy_context):
    store = installed_typestore(["sensor_msgs/msg/Image", "speculative_vlm_msgs/msg/LocomotionCommand"])
    for msgtype in ("sensor_msgs/msg/Image", "speculative_vlm_msgs/msg/LocomotionCommand", "std_msgs/msg/Header"):
        package, kind, name = msgtype.split("/")
        built = json.loads((Path(get_package_share_directory(package)) / kind / f"{name}.json").read_text())
        assert store.hash_rihs01(msgtype) == built["type_hashes"][0]["hash_string"]


def test_record_writes_an_mcap_bag_with_every_message(recorded_bag):
    metadata = yaml.safe_load((recorded_bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert metadata["storage_identifier"] == "mcap"
    counts = {t["topic_metadata"]["name"]: t["message_count"] for t in metadata["topics_with_message_count"]}
    assert counts == {IMAGE_TOPIC: FRAMES, COMMAND_TOPIC: FRAMES}
    image_qos = next(t for t in metadata["topics_with_message_count"] if t["topic_metadata"]["name"] == IMAGE_TOPIC)
    assert image_qos["topic_metadata"]["offered_qos_profiles"][0]["reliability"] == "best_effort"


def test_recorded_bag_decodes_with_its_own_definitions_in_another_tool(recorded_bag):
    # AnyReader builds its types from the definitions stored in the bag, not from ROS.
    with AnyReader([recorded_bag], default_typestore=get_typestore(Stores.EMPTY)) as reader:
        decoded = {c.topic: [] for c in reader.connections}
        for connection, _, raw in reader.messages():
            decoded[connection.topic].append(reader.deserialize(raw, connection.msgtype))
    assert [bytes(m.data) for m in decoded[IMAGE_TOPIC]] == [bytes(image(i).data) for i in range(FRAMES)]
    assert [m.text for m in decoded[COMMAND_TOPIC]] == [f"step {i}" for i in range(FRAMES)]
    assert decoded[COMMAND_TOPIC][2].action == LocomotionCommand.MOVE


def test_replay_delivers_the_same_messages_in_order_with_their_timing(recorded_bag, node):
    inbox = {IMAGE_TOPIC: Inbox(), COMMAND_TOPIC: Inbox()}
    node.create_subscription(Image, IMAGE_TOPIC, inbox[IMAGE_TOPIC], CAMERA_SUB_QOS)
    node.create_subscription(LocomotionCommand, COMMAND_TOPIC, inbox[COMMAND_TOPIC], 10)
    player = cli("replay", str(recorded_bag), "--wait-for-subscribers", "20")
    try:
        inbox[COMMAND_TOPIC].wait_for(FRAMES, 30)
        inbox[IMAGE_TOPIC].wait_for(FRAMES, 5)
        out, _ = player.communicate(timeout=20)
    finally:
        player.kill()
    assert player.returncode == 0, out
    assert inbox[IMAGE_TOPIC].messages == [image(i) for i in range(FRAMES)]
    assert inbox[COMMAND_TOPIC].messages == [command(i) for i in range(FRAMES)]
    # Replay reproduces the recorded spacing (the bag's receive stamps), give or take scheduling.
    stamps = command_stamps(recorded_bag)
    arrivals = [t for t, _ in inbox[COMMAND_TOPIC].items]
    recorded_span, replayed_span = (stamps[-1] - stamps[0]) / 1e9, arrivals[-1] - arrivals[0]
    assert replayed_span == pytest.approx(recorded_span, abs=0.25), (
        f"recorded gaps {[round((b - a) / 1e9, 3) for a, b in zip(stamps, stamps[1:], strict=False)]}, "
        f"replayed gaps {[round(b - a, 3) for a, b in zip(arrivals, arrivals[1:], strict=False)]}")


def command_stamps(bag: Path) -> list[int]:
    with Reader(bag) as reader:
        connection = next(c for c in reader.connections if c.topic == COMMAND_TOPIC)
        return [t for _, t, _ in reader.messages(connections=[connection])]


def test_replay_publishes_clock_from_the_bag_timestamps(recorded_bag, node):
    stamps_in_bag = command_stamps(recorded_bag)
    with Reader(recorded_bag) as reader:
        bag_start_ns = reader.start_time
    clocks = Inbox()
    node.create_subscription(Clock, "/clock", clocks, 10)
    commands = Inbox()
    node.create_subscription(LocomotionCommand, COMMAND_TOPIC, commands, 10)
    player = BagPlayer(node, recorded_bag, clock_hz=50.0, topics=[COMMAND_TOPIC], wait_for_subscribers_s=10)
    player.play()
    time.sleep(0.2)
    stamps = [m.clock.sec * 10**9 + m.clock.nanosec for m in clocks.messages]
    assert len(stamps) >= 10
    assert stamps == sorted(stamps)
    assert stamps[0] == bag_start_ns and stamps[-1] == stamps_in_bag[-1]
    assert set(stamps_in_bag) <= set(stamps)  # each message is preceded by its own time


def test_nodes_with_sim_time_follow_the_replayed_clock(recorded_bag, node, spinner):
    follower = Node("test_bags_sim_time_follower", parameter_overrides=[
        Parameter("use_sim_time", value=True)])
    spinner.add(follower)
    try:
        end_ns = command_stamps(recorded_bag)[-1]
        wait_until(lambda: node.count_subscribers("/clock") > 0, 10, "the follower to subscribe to /clock")
        BagPlayer(node, recorded_bag, rate=4.0, topics=[COMMAND_TOPIC]).play()
        wait_until(lambda: follower.get_clock().now().nanoseconds == end_ns, 5, "the follower's clock to reach the bag end")
    finally:
        spinner.remove(follower)
        follower.destroy_node()


def test_rate_factor_compresses_playback_time(recorded_bag, node):
    commands = Inbox()
    node.create_subscription(LocomotionCommand, "/fast/command", commands, 10)
    player = BagPlayer(node, recorded_bag, rate=3.0, topics=[COMMAND_TOPIC],
                       remap={COMMAND_TOPIC: "/fast/command"}, wait_for_subscribers_s=10)
    player.play()
    commands.wait_for(FRAMES, 5)
    arrivals = [t for t, _ in commands.items]
    assert len(arrivals) == FRAMES
    stamps = command_stamps(recorded_bag)
    assert arrivals[-1] - arrivals[0] == pytest.approx((stamps[-1] - stamps[0]) / 1e9 / 3.0, abs=0.12)


def test_start_offset_skips_the_beginning(recorded_bag, node):
    commands = Inbox()
    node.create_subscription(LocomotionCommand, "/offset/motion/command", commands, 10)
    with Reader(recorded_bag) as reader:
        connection = next(c for c in reader.connections if c.topic == COMMAND_TOPIC)
        stamps = [t for _, t, _ in reader.messages(connections=[connection])]
        start_ns = reader.start_time
    offset_s = (stamps[3] - start_ns) / 1e9 - 0.01  # just before the fourth command
    BagPlayer(node, recorded_bag, topics=[COMMAND_TOPIC], namespace="offset", start_offset_s=offset_s,
              wait_for_subscribers_s=10).play()
    commands.wait_for(FRAMES - 3, 5)
    assert [m.text for m in commands.messages] == [f"step {i}" for i in range(3, FRAMES)]


def test_loop_plays_the_bag_again_until_stopped(recorded_bag, node):
    commands = Inbox()
    node.create_subscription(LocomotionCommand, "/loop/command", commands, 10)
    player = BagPlayer(node, recorded_bag, rate=4.0, loop=True, topics=[COMMAND_TOPIC],
                       remap={COMMAND_TOPIC: "/loop/command"}, wait_for_subscribers_s=10)
    player.start()
    commands.wait_for(2 * FRAMES + 1, 10)
    player.stop()
    assert player.wait(5)
    assert player.report.loops >= 2 and player.report.stopped
    assert [m.text for m in commands.messages[: 2 * FRAMES]] == [f"step {i}" for i in range(FRAMES)] * 2


def write_bag_like_ros2_bag_record(path: Path, storage: StoragePlugin) -> list[Image]:
    """A bag as `ros2 bag record -s mcap|sqlite3` on Kilted leaves it: <name>_0.<ext>, version 9 metadata."""
    store = get_typestore(Stores.ROS2_KILTED)
    ros_image = store.types["sensor_msgs/msg/Image"]
    header = store.types["std_msgs/msg/Header"]
    stamp = store.types["builtin_interfaces/msg/Time"]
    sensor_qos = Qos(QosHistory.KEEP_LAST, 5, QosReliability.BEST_EFFORT, QosDurability.VOLATILE,
                     QosTime(9223372036, 854775807), QosTime(9223372036, 854775807), QosLiveliness.AUTOMATIC,
                     QosTime(9223372036, 854775807), False)
    expected = []
    t0 = 1_700_000_000_000_000_000
    with Writer(path, version=9, storage_plugin=storage) as writer:
        connection = writer.add_connection(IMAGE_TOPIC, "sensor_msgs/msg/Image", typestore=store,
                                           offered_qos_profiles=[sensor_qos])
        for i in range(4):
            data = bytes(range(i, i + 12))
            msg = ros_image(header=header(stamp=stamp(sec=1_700_000_000 + i, nanosec=0), frame_id="go2_camera"),
                            height=2, width=2, encoding="bgr8", is_bigendian=0, step=6, data=np.frombuffer(data, dtype="uint8"))
            writer.write(connection, t0 + i * 100_000_000, store.serialize_cdr(msg, "sensor_msgs/msg/Image"))
            expected_msg = Image(height=2, width=2, encoding="bgr8", step=6, data=data)
            expected_msg.header.stamp.sec = 1_700_000_000 + i
            expected_msg.header.frame_id = "go2_camera"
            expected.append(expected_msg)
    # ros2 bag names the first file <bag>_0.<ext> and records the distro it ran on.
    ext = "mcap" if storage == StoragePlugin.MCAP else "db3"
    (path / f"{path.name}.{ext}").rename(path / f"{path.name}_0.{ext}")
    metadata = yaml.safe_load((path / "metadata.yaml").read_text())
    info = metadata["rosbag2_bagfile_information"]
    info["relative_file_paths"] = [f"{path.name}_0.{ext}"]
    info["files"][0]["path"] = f"{path.name}_0.{ext}"
    info["ros_distro"] = "kilted"
    (path / "metadata.yaml").write_text(yaml.safe_dump(metadata))
    return expected


@pytest.mark.parametrize("storage", [StoragePlugin.MCAP, StoragePlugin.SQLITE3], ids=["mcap", "sqlite3"])
def test_plays_a_bag_recorded_by_ros2_bag_record(tmp_path, node, storage):
    path = tmp_path / "rosbag2_2026_11_22-10_00_00"
    expected = write_bag_like_ros2_bag_record(path, storage)
    frames = Inbox()
    node.create_subscription(Image, "/go2/camera/image_raw", frames, CAMERA_SUB_QOS)
    player = BagPlayer(node, path, namespace="go2", wait_for_subscribers_s=10)
    report = player.play()
    frames.wait_for(len(expected), 5)
    assert report.published == {"/go2/camera/image_raw": len(expected)}
    assert frames.messages == expected
    assert player.mismatched == {}


def test_player_warns_when_the_bag_has_another_definition_of_a_type(tmp_path, node):
    # An older LocomotionCommand without `verified` and `text`, recorded under the same name.
    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg("std_msgs/Header header\nuint8 action\nfloat32 vx\nfloat32 vy\n"
                                      "float32 vyaw\nfloat32 duration\n", "speculative_vlm_msgs/msg/LocomotionCommand"))
    path = tmp_path / "old_bag"
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection(COMMAND_TOPIC, "speculative_vlm_msgs/msg/LocomotionCommand", typestore=store)
        old = store.types["speculative_vlm_msgs/msg/LocomotionCommand"]
        header = store.types["std_msgs/msg/Header"](stamp=store.types["builtin_interfaces/msg/Time"](sec=0, nanosec=0),
                                                   frame_id="")
        writer.write(connection, 1, store.serialize_cdr(old(header=header, action=0, vx=0.5, vy=0.0, vyaw=0.0,
                                                            duration=1.0), "speculative_vlm_msgs/msg/LocomotionCommand"))
    player = BagPlayer(node, path, topics=[COMMAND_TOPIC], namespace="old")
    assert set(player.mismatched) == {COMMAND_TOPIC}


def test_recorder_api_records_in_process_and_refuses_to_overwrite(node, tmp_path):
    path = tmp_path / "api_bag"
    publisher = node.create_publisher(LocomotionCommand, "/api/command", 10)
    with BagRecorder(node, path, ["/api/command"]) as recorder:
        wait_until(lambda: publisher.get_subscription_count() > 0, 10, "the recorder to subscribe")
        for i in range(3):
            publisher.publish(command(i))
        wait_until(lambda: recorder.counts.get("/api/command") == 3, 5, "three recorded commands")
    with pytest.raises(FileExistsError, match="never overwrites"):
        BagRecorder(node, path, ["/api/command"])
    with Reader(path) as reader:
        assert reader.message_count == 3
