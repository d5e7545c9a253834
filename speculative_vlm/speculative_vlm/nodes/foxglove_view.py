"""The Foxglove view: the graph served to the Foxglove app over a WebSocket, no ROS desktop needed.

rviz and rqt cannot run on the machines this project targets, nor on an operator's laptop
without ROS. This node subscribes to the graph and logs what an operator watches to typed
channels of a Foxglove WebSocket server (``foxglove-sdk``; connect the app to
``ws://<host>:<port>``, 127.0.0.1:8765 by default). Channel names are the resolved ROS names,
so a namespace shows:

  <ns>/camera/image_raw/compressed   foxglove.CompressedImage: the camera's own JPEG
                                     (``camera/image_raw/compressed``) when it publishes one,
                                     else ``camera/image_raw`` encoded here
  <ns>/monitor/image/compressed      foxglove.CompressedImage: the monitor's annotated frame
  <ns>/tf                            foxglove.FrameTransform: odom -> base_link from ``odom``
  <ns>/odom/pose                     foxglove.PoseInFrame: the robot's pose
  <ns>/odom/path                     foxglove.PosesInFrame: where it has been
  <ns>/scene                         foxglove.SceneUpdate: the room and objects of the sim scene
                                     (``scene``), and the robot's body riding on base_link
  <ns>/motion/command, <ns>/motion/active_command, <ns>/drafter/stats, <ns>/bridge/link,
  <ns>/motion/estop_engaged, /diagnostics
                                     the ROS messages themselves (CDR with their ros2msg schema,
                                     as foxglove_bridge and MCAP bags carry them), so the Plot,
                                     State Transitions, Diagnostics and Raw Messages panels
                                     read every field
  /rosout                            foxglove.Log

State a late client needs at once (scene, link, e-stop, last commands) is sent again to
each client that subscribes. Images are encoded only while a client watches them.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import foxglove
from diagnostic_msgs.msg import DiagnosticArray
from foxglove.channels import (
    CompressedImageChannel,
    FrameTransformChannel,
    LogChannel,
    PoseInFrameChannel,
    PosesInFrameChannel,
    SceneUpdateChannel,
)
from foxglove.messages import (
    Color,
    CompressedImage,
    CubePrimitive,
    CylinderPrimitive,
    FrameTransform,
    Log,
    LogLevel,
    Pose,
    PoseInFrame,
    PosesInFrame,
    Quaternion,
    SceneEntity,
    SceneUpdate,
    SpherePrimitive,
    TextPrimitive,
    Timestamp,
    Vector3,
)
from foxglove.websocket import ServerListener
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import Log as RosLog
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage as RosCompressedImage
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, String

from speculative_vlm.bags.typestore import installed_typestore
from speculative_vlm.go2.scene import Scene, SceneError, load_scene
from speculative_vlm.nodes.image_conversion import ImageConversionError
from speculative_vlm.nodes.monitor import to_bgr
from speculative_vlm.nodes.parameters import float_range, int_range, start_only
from speculative_vlm.nodes.spin import spin_node
from speculative_vlm_msgs.msg import DecodingStats, LocomotionCommand

# Latched publishers (transient local): a volatile subscription would miss their last value.
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
# rosout is transient local too (depth 1000 in rcl): a late view still gets recent lines.
ROSOUT_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
LOG_LEVELS = {RosLog.DEBUG: LogLevel.Debug, RosLog.INFO: LogLevel.Info, RosLog.WARN: LogLevel.Warning,
              RosLog.ERROR: LogLevel.Error, RosLog.FATAL: LogLevel.Fatal}


@dataclass(frozen=True)
class Forwarded:
    """A ROS topic passed through as CDR under its ros2msg schema."""

    topic: str
    msg_type: type
    type_name: str
    qos: QoSProfile | int


FORWARDED = (
    Forwarded("motion/command", LocomotionCommand, "speculative_vlm_msgs/msg/LocomotionCommand", 10),
    Forwarded("motion/active_command", LocomotionCommand, "speculative_vlm_msgs/msg/LocomotionCommand", LATCHED),
    Forwarded("drafter/stats", DecodingStats, "speculative_vlm_msgs/msg/DecodingStats", 10),
    Forwarded("bridge/link", String, "std_msgs/msg/String", LATCHED),
    Forwarded("motion/estop_engaged", Bool, "std_msgs/msg/Bool", LATCHED),
    Forwarded("/diagnostics", DiagnosticArray, "diagnostic_msgs/msg/DiagnosticArray", 10),
)


def _stamp(stamp) -> Timestamp:
    return Timestamp(stamp.sec, stamp.nanosec)


def _colour(rgb: tuple[int, int, int], alpha: float = 1.0) -> Color:
    return Color(r=rgb[0] / 255.0, g=rgb[1] / 255.0, b=rgb[2] / 255.0, a=alpha)


def _pose(x: float, y: float, z: float, yaw: float = 0.0) -> Pose:
    return Pose(position=Vector3(x=x, y=y, z=z),
                orientation=Quaternion(x=0.0, y=0.0, z=math.sin(yaw / 2.0), w=math.cos(yaw / 2.0)))


def scene_entities(scene: Scene, frame_id: str) -> list[SceneEntity]:
    """The room's walls and each object (sphere, cube, cone) with its name, in the odometry frame."""
    room = scene.room
    grey, thickness, h = (150, 150, 150), 0.05, room.wall_height
    cx, cy = (room.x_min + room.x_max) / 2.0, (room.y_min + room.y_max) / 2.0
    sx, sy = room.x_max - room.x_min, room.y_max - room.y_min
    walls = [CubePrimitive(pose=_pose(x, y, h / 2.0), size=Vector3(x=lx, y=ly, z=h), color=_colour(grey, 0.35))
             for x, y, lx, ly in ((cx, room.y_min, sx, thickness), (cx, room.y_max, sx, thickness),
                                  (room.x_min, cy, thickness, sy), (room.x_max, cy, thickness, sy))]
    entities = [SceneEntity(frame_id=frame_id, id="room", cubes=walls)]
    for obj in scene.objects:
        colour = _colour(obj.colour)
        label = TextPrimitive(pose=_pose(obj.x, obj.y, 2.2 * obj.size + 0.25), billboard=True, font_size=14.0,
                              scale_invariant=True, color=_colour((255, 255, 255)), text=obj.name)
        if obj.shape == "ball":
            shapes = {"spheres": [SpherePrimitive(pose=_pose(obj.x, obj.y, obj.size),
                                                  size=Vector3(x=2 * obj.size, y=2 * obj.size, z=2 * obj.size),
                                                  color=colour)]}
        elif obj.shape == "box":
            shapes = {"cubes": [CubePrimitive(pose=_pose(obj.x, obj.y, obj.size / 2.0),
                                              size=Vector3(x=obj.size, y=obj.size, z=obj.size), color=colour)]}
        else:  # cone: base radius `size`, height twice that
            shapes = {"cylinders": [CylinderPrimitive(pose=_pose(obj.x, obj.y, obj.size),
                                                      size=Vector3(x=2 * obj.size, y=2 * obj.size, z=2 * obj.size),
                                                      bottom_scale=1.0, top_scale=0.0, color=colour)]}
        entities.append(SceneEntity(frame_id=frame_id, id=obj.name, texts=[label], **shapes))
    return entities


def robot_entity(base_frame: str) -> SceneEntity:
    """The Go2's body (0.70 x 0.31 x 0.40 m) as a box riding on base_link, with its heading."""
    body = CubePrimitive(pose=_pose(0.0, 0.0, 0.2), size=Vector3(x=0.70, y=0.31, z=0.25),
                         color=Color(r=0.85, g=0.85, b=0.9, a=0.9))
    nose = SpherePrimitive(pose=_pose(0.38, 0.0, 0.25), size=Vector3(x=0.08, y=0.08, z=0.08),
                           color=Color(r=1.0, g=0.6, b=0.0, a=1.0))
    return SceneEntity(frame_id=base_frame, id="robot", frame_locked=True, cubes=[body], spheres=[nose])


class FoxgloveViewError(RuntimeError):
    """The view cannot start (its port is taken, its address is not this machine's)."""


class _ReplayOnSubscribe(ServerListener):
    """Sends a channel's last message again to a client that subscribes (latched state)."""

    def __init__(self, replay: Callable[[int], None]) -> None:
        self._replay = replay

    def on_subscribe(self, client, channel) -> None:  # noqa: ARG002 - the protocol's signature
        self._replay(channel.id)


class FoxgloveViewNode(Node):
    """Serves the graph's images, pose, path, scene, commands, statistics, link, e-stop,
    diagnostics and logs to the Foxglove app over a WebSocket (see the module docstring)."""

    def __init__(self, **kwargs) -> None:
        super().__init__("foxglove", **kwargs)
        d = self.declare_parameter
        d("host", "127.0.0.1", start_only(
            "Address the WebSocket server binds (0.0.0.0: every interface; there is no authentication)"))
        d("port", 8765, int_range(0, 65535, "WebSocket port (0 picks a free one)", read_only=True))
        d("scene", "", start_only("Sim scene (packaged name or YAML path) drawn in the 3D view; empty: none"))
        d("odom_topic", "odom", start_only("Odometry giving pose, path and tf"))
        d("image_topic", "camera/image_raw", start_only("Camera image"))
        d("compressed_topic", "camera/image_raw/compressed",
          start_only("The camera's JPEG; when it publishes, image_topic is not encoded here"))
        d("monitor_topic", "monitor/image", start_only("Annotated image"))
        d("odom_frame", "odom", start_only("Frame of the scene and of odometry without a frame_id"))
        d("base_frame", "base_link", start_only("Robot frame for odometry without a child_frame_id"))
        d("image_max_rate_hz", 10.0, float_range(0.5, 60.0, "Most frames per second per image channel"))
        d("jpeg_quality", 80, int_range(10, 100, "JPEG quality of images encoded here"))
        d("pose_max_rate_hz", 20.0, float_range(1.0, 100.0, "Most pose and tf messages per second"))
        d("path_min_step_m", 0.05, float_range(0.0, 10.0, "Distance between recorded path poses, m"))
        d("path_max_poses", 5000, int_range(10, 1_000_000, "Path poses kept (oldest dropped)"))

        p = self.get_parameter
        # Its own foxglove context (not the SDK's global one): two views in one process stay apart.
        # (Not `self._context`: rclpy's Node keeps its rclpy context there.) The server starts
        # first, so a port in use fails before any subscription exists.
        ctx = self._view_context = foxglove.Context()
        host, port = p("host").value, p("port").value
        try:
            self._server = foxglove.start_server(name=self.get_fully_qualified_name(), host=host, port=port,
                                                 context=ctx, server_listener=_ReplayOnSubscribe(self._replay))
        except RuntimeError as exc:  # the SDK's FoxgloveError
            super().destroy_node()
            raise FoxgloveViewError(f"the Foxglove view cannot serve on {host}:{port}: {exc}; set the foxglove "
                                    "section's port (0 picks a free one) or stop what holds it") from exc
        self.port: int = self._server.port
        self._lock = threading.Lock()
        self._last: dict[int, Callable[[], None]] = {}  # channel id -> re-log its latest message
        self._last_image: dict[str, float] = {}
        self._compressed_seen = 0.0
        self._path: list[Pose] = []
        self._path_end: tuple[float, float] | None = None  # (x, y) of the last recorded pose
        self._last_path_log = self._last_pose_log = 0.0
        self._scene = self._load_scene(p("scene").value)

        ns = self.resolve_topic_name
        self._camera = CompressedImageChannel(ns(p("compressed_topic").value), context=ctx)
        self._monitor = CompressedImageChannel(ns(p("monitor_topic").value) + "/compressed", context=ctx)
        self._tf = FrameTransformChannel(ns("tf"), context=ctx)
        self._pose = PoseInFrameChannel(ns(p("odom_topic").value) + "/pose", context=ctx)
        self._path_channel = PosesInFrameChannel(ns(p("odom_topic").value) + "/path", context=ctx)
        self._scene_channel = SceneUpdateChannel(ns("scene"), context=ctx)
        self._log = LogChannel("/rosout", context=ctx)
        store = installed_typestore([f.type_name for f in FORWARDED])
        self._forwarded: list[foxglove.Channel] = []
        for f in FORWARDED:
            definition, _ = store.generate_msgdef(f.type_name, ros_version=2)
            channel = foxglove.Channel(
                ns(f.topic), message_encoding="cdr", context=ctx,
                schema=foxglove.Schema(name=f.type_name, encoding="ros2msg", data=definition.encode()))
            self._forwarded.append(channel)
            self.create_subscription(f.msg_type, f.topic, self._forwarder(channel), f.qos, raw=True)

        self.create_subscription(RosCompressedImage, p("compressed_topic").value, self._on_compressed,
                                 qos_profile_sensor_data)
        self.create_subscription(Image, p("image_topic").value, self._on_image, qos_profile_sensor_data)
        self.create_subscription(Image, p("monitor_topic").value, self._on_monitor, qos_profile_sensor_data)
        self.create_subscription(Odometry, p("odom_topic").value, self._on_odom, 10)
        self.create_subscription(RosLog, "/rosout", self._on_rosout, ROSOUT_QOS)

        self._log_scene()
        self.get_logger().info(f"Foxglove view on ws://{host}:{self.port} "
                               "(Foxglove app: Open connection -> Foxglove WebSocket)")

    # -- helpers ---------------------------------------------------------------------------

    def _load_scene(self, name: str) -> Scene | None:
        if not name:
            return None
        try:
            return load_scene(None if name == "default" else name)
        except SceneError as exc:
            self.get_logger().error(f"scene {name!r} not drawn: {exc}")
            return None

    def _now_ns(self) -> int | None:
        now = self.get_clock().now().nanoseconds
        return now if now > 0 else None  # sim time before the first /clock: the SDK's own clock

    def _remember(self, channel_id: int, relog: Callable[[], None]) -> None:
        with self._lock:
            self._last[channel_id] = relog

    def _replay(self, channel_id: int) -> None:
        with self._lock:
            relog = self._last.get(channel_id)
        if relog is not None:
            relog()

    def _forwarder(self, channel: foxglove.Channel) -> Callable[[bytes], None]:
        def forward(data: bytes) -> None:
            log_time = self._now_ns()
            channel.log(data, log_time=log_time)
            self._remember(channel.id(), lambda: channel.log(data, log_time=log_time))

        return forward

    def _image_due(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last_image.get(key, 0.0) < 1.0 / self.get_parameter("image_max_rate_hz").value:
            return False
        self._last_image[key] = now
        return True

    def _log_jpeg(self, channel: CompressedImageChannel, key: str, msg: Image) -> None:
        if not channel.has_sinks() or not self._image_due(key):
            return  # nobody watches: no encoding
        try:
            frame = to_bgr(msg)
        except ImageConversionError as exc:
            self.get_logger().warning(f"{key}: {exc}", throttle_duration_sec=10.0)
            return
        ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.get_parameter("jpeg_quality").value])
        if ok:
            channel.log(CompressedImage(timestamp=_stamp(msg.header.stamp), frame_id=msg.header.frame_id,
                                        data=jpeg.tobytes(), format="jpeg"), log_time=self._now_ns())

    # -- subscriptions ---------------------------------------------------------------------

    def _on_compressed(self, msg: RosCompressedImage) -> None:
        self._compressed_seen = time.monotonic()
        if not self._camera.has_sinks() or not self._image_due("camera"):
            return
        image_format = "png" if "png" in msg.format.lower() else "jpeg"
        self._camera.log(CompressedImage(timestamp=_stamp(msg.header.stamp), frame_id=msg.header.frame_id,
                                         data=bytes(msg.data), format=image_format), log_time=self._now_ns())

    def _on_image(self, msg: Image) -> None:
        if time.monotonic() - self._compressed_seen < 2.0:
            return  # the camera sends its own JPEG: no need to encode
        self._log_jpeg(self._camera, "camera", msg)

    def _on_monitor(self, msg: Image) -> None:
        self._log_jpeg(self._monitor, "monitor", msg)

    def _on_odom(self, msg: Odometry) -> None:
        now = time.monotonic()
        if now - self._last_pose_log < 1.0 / self.get_parameter("pose_max_rate_hz").value:
            return
        self._last_pose_log = now
        frame = msg.header.frame_id or self.get_parameter("odom_frame").value
        child = msg.child_frame_id or self.get_parameter("base_frame").value
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        stamp, log_time = _stamp(msg.header.stamp), self._now_ns()
        # foxglove messages are write-only objects: each is built from the ROS fields.
        pose = Pose(position=Vector3(x=p.x, y=p.y, z=p.z), orientation=Quaternion(x=q.x, y=q.y, z=q.z, w=q.w))
        transform = FrameTransform(timestamp=stamp, parent_frame_id=frame, child_frame_id=child,
                                   translation=Vector3(x=p.x, y=p.y, z=p.z),
                                   rotation=Quaternion(x=q.x, y=q.y, z=q.z, w=q.w))
        in_frame = PoseInFrame(timestamp=stamp, frame_id=frame, pose=pose)
        self._tf.log(transform, log_time=log_time)
        self._pose.log(in_frame, log_time=log_time)
        self._remember(self._tf.id(), lambda: self._tf.log(transform, log_time=log_time))
        self._remember(self._pose.id(), lambda: self._pose.log(in_frame, log_time=log_time))
        with self._lock:
            last = self._path_end
            if last is None or math.hypot(p.x - last[0], p.y - last[1]) >= self.get_parameter("path_min_step_m").value:
                self._path.append(pose)
                self._path_end = (p.x, p.y)
                del self._path[: max(0, len(self._path) - self.get_parameter("path_max_poses").value)]
            due = now - self._last_path_log >= 0.5
            if due:
                self._last_path_log = now
                path = PosesInFrame(timestamp=stamp, frame_id=frame, poses=list(self._path))
        if due:
            self._path_channel.log(path, log_time=log_time)
            self._remember(self._path_channel.id(), lambda: self._path_channel.log(path, log_time=log_time))

    def _on_rosout(self, msg: RosLog) -> None:
        self._log.log(Log(timestamp=_stamp(msg.stamp), level=LOG_LEVELS.get(msg.level, LogLevel.Unknown),
                          message=msg.msg, name=msg.name, file=msg.file, line=msg.line), log_time=self._now_ns())

    def _log_scene(self) -> None:
        entities = [robot_entity(self.get_parameter("base_frame").value)]
        if self._scene is not None:
            entities += scene_entities(self._scene, self.get_parameter("odom_frame").value)
        update = SceneUpdate(entities=entities)
        self._scene_channel.log(update)
        self._remember(self._scene_channel.id(), lambda: self._scene_channel.log(update))

    def destroy_node(self) -> None:
        self._server.stop()
        super().destroy_node()


def start_for_bringup(sections: Mapping[str, Any]) -> FoxgloveViewNode | None:
    """The view `speculative-vlm up` starts beside the graph (rclpy already initialised with the config
    as its params file), or None when the config's ``foxglove`` section does not enable it.

    Its scene is the simulated Go2's (``bringup.sim_scene``) unless the section names one. A view
    that cannot start (port in use) is reported and skipped: the robot's graph matters more.
    """
    from rclpy.parameter import Parameter

    from speculative_vlm.launch_graph import scene_of

    section = dict((sections.get("foxglove") or {}).get("ros__parameters") or {})
    if not section.get("enabled", False):
        return None
    overrides = [] if "scene" in section else [Parameter("scene", value=scene_of(sections))]
    try:
        view = FoxgloveViewNode(parameter_overrides=overrides)
    except FoxgloveViewError as exc:
        print(f"warning: {exc}", flush=True)
        return None
    print(f"Foxglove view: ws://{view.get_parameter('host').value}:{view.port}", flush=True)
    return view


def main(args: list[str] | None = None) -> int:
    return spin_node(FoxgloveViewNode, args)


if __name__ == "__main__":
    sys.exit(main())
