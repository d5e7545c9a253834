"""The monitor node: what the robot sees, says and does, drawn for rqt and rviz.

Subscribes (relative names, so a namespace applies; each topic is a parameter):
  camera/image_raw (sensor_msgs/Image, sensor-data QoS), drafter/text (std_msgs/String, the
  verified text), motion/active_command (LocomotionCommand: what the motion node executes, clamped,
  whoever sent it), drafter/stats (DecodingStats), odom (nav_msgs/Odometry).
Publishes:
  monitor/image (sensor_msgs/Image, bgr8, the camera's size and stamp): the frame with the
  commanded velocity as an arrow (up = forward, left = left, the bend = yaw rate), the
  command, the acceptance and throughput of decoding, and the verified text, for
  rqt_image_view;
  monitor/velocity_marker (visualization_msgs/Marker): an arrow for the commanded velocity at
  the robot's odometry pose (or at the origin of ``base_frame`` before any odometry), moving
  with the robot at up to 10 Hz, deleted when the command is not a MOVE, for rviz;
  /diagnostics: how old each input is, WARN when the camera or odometry has gone stale.
Drawing is cheap (a few OpenCV primitives) and runs at most at ``max_rate_hz``.
"""

from __future__ import annotations

import math
import sys
import time

import cv2
import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String
from visualization_msgs.msg import Marker

from speculative_vlm.nodes.image_conversion import ImageConversionError, image_to_numpy, numpy_to_image
from speculative_vlm.nodes.parameters import float_range, on_parameters_set, set_timer_period, start_only
from speculative_vlm.nodes.spin import spin_node
from speculative_vlm_msgs.msg import DecodingStats, LocomotionCommand

ACTION_NAMES = {
    LocomotionCommand.MOVE: "MOVE",
    LocomotionCommand.STOP: "STOP",
    LocomotionCommand.STAND_UP: "STAND_UP",
    LocomotionCommand.STAND_DOWN: "STAND_DOWN",
    LocomotionCommand.SIT: "SIT",
    LocomotionCommand.DONE: "DONE",
}
# cv2.cvtColor codes that bring an encoding to BGR (bgr8 needs none).
TO_BGR = {
    "rgb8": cv2.COLOR_RGB2BGR,
    "bgra8": cv2.COLOR_BGRA2BGR,
    "rgba8": cv2.COLOR_RGBA2BGR,
    "mono8": cv2.COLOR_GRAY2BGR,
    "8UC1": cv2.COLOR_GRAY2BGR,
}
GREEN, RED, WHITE, YELLOW = (60, 220, 60), (40, 40, 230), (255, 255, 255), (0, 220, 255)


def to_bgr(msg: Image) -> np.ndarray:
    """A BGR copy of a camera image; ImageConversionError for encodings we cannot show."""
    array = image_to_numpy(msg)
    if msg.encoding in ("bgr8", "8UC3"):
        return array.copy()
    if msg.encoding in ("mono16", "16UC1"):
        return cv2.cvtColor((array >> 8).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    if msg.encoding not in TO_BGR:
        raise ImageConversionError(f"the monitor cannot draw on {msg.encoding} images")
    return cv2.cvtColor(array, TO_BGR[msg.encoding])


def command_summary(cmd: LocomotionCommand) -> str:
    name = ACTION_NAMES.get(cmd.action, f"action {cmd.action}")
    if cmd.action != LocomotionCommand.MOVE:
        return name
    return f"{name} vx {cmd.vx:+.2f} vy {cmd.vy:+.2f} m/s vyaw {cmd.vyaw:+.2f} rad/s for {cmd.duration:.1f} s"


def stats_summary(stats: DecodingStats) -> str:
    return (f"accepted {100 * stats.acceptance_rate:.0f}% {stats.tokens_per_pass:.2f} tok/pass "
            f"{stats.tokens_per_second:.1f} tok/s early hits {stats.early_hits}/{stats.early_hits + stats.early_misses}")


def _wrap(lines: list[tuple[str, tuple[int, int, int]]], width: int, scale: float,
          thickness: int) -> list[tuple[str, tuple[int, int, int]]]:
    """Break lines at spaces so each fits `width` pixels."""
    out = []
    for line, colour in lines:
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] > width:
                out.append((current, colour))
                current = word
            else:
                current = candidate
        out.append((current, colour))
    return out


def draw_annotations(frame: np.ndarray, cmd: LocomotionCommand | None, stats: DecodingStats | None,
                     text: str, max_speed: float, max_yaw_rate: float) -> np.ndarray:
    """Draw the command arrow and the text lines onto `frame` (BGR, modified in place)."""
    h, w = frame.shape[:2]
    scale = max(0.35, w / 1000.0)  # readable from 320 px to full HD
    thickness = 1 if w < 800 else 2
    line_h = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][1] + max(4, int(8 * scale))
    if cmd is not None and cmd.action == LocomotionCommand.MOVE:
        base = np.array([w / 2.0, h - 0.08 * h])
        reach = 0.4 * min(w, h)
        # Image up is forward (vx), image left is the robot's left (vy).
        tip = base + reach * np.array([-cmd.vy, -cmd.vx]) / max(max_speed, 1e-6)
        # The yaw rate bends the arrow: a polyline curving to the turn direction.
        bend = -cmd.vyaw / max(max_yaw_rate, 1e-6) * 0.5 * reach
        points = []
        for t in np.linspace(0.0, 1.0, 12):
            p = base + t * (tip - base)
            points.append(p + np.array([bend * t * t, 0.0]))
        points = np.array(points, dtype=np.int32)
        colour = GREEN if cmd.verified else RED
        cv2.polylines(frame, [points[:-1]], False, colour, thickness + 1, cv2.LINE_AA)
        cv2.arrowedLine(frame, tuple(int(v) for v in points[-2]), tuple(int(v) for v in points[-1]), colour,
                        thickness + 1, cv2.LINE_AA, tipLength=0.9)
        cv2.circle(frame, tuple(int(v) for v in base), thickness + 2, colour, -1, cv2.LINE_AA)
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if cmd is not None:
        lines.append((command_summary(cmd) + ("" if cmd.verified else "  UNVERIFIED"), GREEN if cmd.verified else RED))
    if stats is not None:
        lines.append((stats_summary(stats), YELLOW))
    if text:
        lines.append((text, WHITE))
    wrapped = _wrap(lines, w - 8, scale, thickness)
    if wrapped:
        # A darkened band behind the text keeps it readable on any background.
        band = frame[: min(h, line_h * len(wrapped) + line_h // 2)]
        band[:] = (band * 0.35).astype(frame.dtype)
    for i, (line, colour) in enumerate(wrapped):
        cv2.putText(frame, line, (4, line_h * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return frame


class MonitorNode(Node):
    """Annotated image, velocity marker and input-freshness diagnostics for rqt and rviz."""

    def __init__(self, **kwargs) -> None:
        super().__init__("monitor", **kwargs)
        d = self.declare_parameter
        d("image_topic", "camera/image_raw", start_only("Camera image to annotate"))
        d("text_topic", "drafter/text", start_only("Verified model text (std_msgs/String)"))
        d("command_topic", "motion/active_command", start_only("LocomotionCommand to draw"))
        d("stats_topic", "drafter/stats", start_only("DecodingStats of the current session"))
        d("odom_topic", "odom", start_only("Odometry that places the velocity marker"))
        d("base_frame", "base_link", start_only("Marker frame until odometry arrives"))
        d("max_rate_hz", 15.0, float_range(0.5, 60.0, "Most annotated images per second"))
        d("arrow_max_speed", 1.0, float_range(0.05, 5.0, "Speed, m/s, drawn as the longest image arrow"))
        d("arrow_max_yaw_rate", 1.5, float_range(0.05, 5.0, "Yaw rate, rad/s, drawn as the strongest bend"))
        d("marker_scale", 1.0, float_range(0.01, 10.0, "Marker length per m/s of commanded speed, m"))
        d("stale_after_s", 2.0, float_range(0.1, 60.0, "Camera or odometry older than this is reported WARN"))
        d("diagnostics_period_s", 1.0, float_range(0.1, 10.0, "Period of /diagnostics messages, s"))

        p = self.get_parameter
        self._command: LocomotionCommand | None = None
        self._stats: DecodingStats | None = None
        self._text = ""
        self._odom: Odometry | None = None
        self._last_seen: dict[str, float] = {}
        self._last_drawn = 0.0
        self._last_marker = 0.0
        self.annotated = 0
        self.undrawable = 0
        self._last_error = ""
        # Reliable output: rqt_image_view and rviz subscribe reliably by default.
        out_qos = QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE)
        self._image_pub = self.create_publisher(Image, "monitor/image", out_qos)
        self._marker_pub = self.create_publisher(Marker, "monitor/velocity_marker", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(Image, p("image_topic").value, self._on_image, qos_profile_sensor_data)
        self.create_subscription(String, p("text_topic").value, self._on_text, 10)
        self.create_subscription(LocomotionCommand, p("command_topic").value, self._on_command, 10)
        self.create_subscription(DecodingStats, p("stats_topic").value, self._on_stats, 10)
        self.create_subscription(Odometry, p("odom_topic").value, self._on_odom, 10)
        self._diag_timer = self.create_timer(p("diagnostics_period_s").value, self._publish_diagnostics)
        # The drawing and staleness parameters are read on use; the diagnostics timer is told.
        on_parameters_set(self, self._on_parameters_set)

    def _on_parameters_set(self, values: dict[str, object]) -> None:
        if "diagnostics_period_s" in values:
            set_timer_period(self._diag_timer, values["diagnostics_period_s"])

    def _seen(self, what: str) -> None:
        self._last_seen[what] = time.monotonic()

    def _on_text(self, msg: String) -> None:
        self._seen("text")
        self._text = msg.data

    def _on_stats(self, msg: DecodingStats) -> None:
        self._seen("stats")
        self._stats = msg

    def _on_odom(self, msg: Odometry) -> None:
        self._seen("odom")
        self._odom = msg
        # Move the marker with the robot, at a rate rviz needs, not at the odometry rate.
        now = time.monotonic()
        if self._command is not None and now - self._last_marker >= 0.1:
            self._publish_marker()

    def _on_command(self, msg: LocomotionCommand) -> None:
        self._seen("command")
        self._command = msg
        self._publish_marker()

    def _publish_marker(self) -> None:
        self._last_marker = time.monotonic()
        self._marker_pub.publish(self.velocity_marker(self._command))

    def _on_image(self, msg: Image) -> None:
        self._seen("image")
        now = time.monotonic()
        if now - self._last_drawn < 1.0 / self.get_parameter("max_rate_hz").value:
            return
        try:
            frame = to_bgr(msg)
        except ImageConversionError as exc:
            self.undrawable += 1
            self._last_error = str(exc)
            return
        self._last_drawn = now
        text = self._text or (self._command.text if self._command is not None else "")
        draw_annotations(frame, self._command, self._stats, text,
                         self.get_parameter("arrow_max_speed").value, self.get_parameter("arrow_max_yaw_rate").value)
        self._image_pub.publish(numpy_to_image(frame, "bgr8", msg.header))
        self.annotated += 1

    def velocity_marker(self, cmd: LocomotionCommand) -> Marker:
        """An rviz arrow along the commanded planar velocity, at the robot's pose; DELETE if not moving."""
        marker = Marker(ns="commanded_velocity", id=0)
        if self._odom is not None:
            marker.header.frame_id = self._odom.header.frame_id
            marker.pose.position = self._odom.pose.pose.position
            q = self._odom.pose.pose.orientation
            robot_yaw = math.atan2(2.0 * (q.w * q.z + q.x * q.y), 1.0 - 2.0 * (q.y * q.y + q.z * q.z))
        else:
            marker.header.frame_id = self.get_parameter("base_frame").value
            robot_yaw = 0.0
        marker.header.stamp = self.get_clock().now().to_msg()
        speed = math.hypot(cmd.vx, cmd.vy)
        if cmd.action != LocomotionCommand.MOVE or speed < 1e-6 and abs(cmd.vyaw) < 1e-6:
            marker.action = Marker.DELETE
            return marker
        marker.type = Marker.ARROW
        marker.action = Marker.ADD
        yaw = robot_yaw + math.atan2(cmd.vy, cmd.vx)
        marker.pose.orientation.z = math.sin(yaw / 2.0)
        marker.pose.orientation.w = math.cos(yaw / 2.0)
        # A pure rotation still gets a short stub so it shows up.
        marker.scale.x = max(0.05, speed * self.get_parameter("marker_scale").value)
        marker.scale.y = marker.scale.z = 0.05
        marker.color.a = 1.0
        marker.color.g = 0.8 if cmd.verified else 0.0
        marker.color.r = 0.0 if cmd.verified else 1.0
        return marker

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        stale_after = self.get_parameter("stale_after_s").value
        values = []
        stale = []
        for what in ("image", "command", "text", "stats", "odom"):
            seen = self._last_seen.get(what)
            age = None if seen is None else now - seen
            values.append(KeyValue(key=f"{what} age s", value="never" if age is None else f"{age:.2f}"))
            if what in ("image", "odom") and (age is None or age > stale_after):
                stale.append(what)
        values += [KeyValue(key="annotated images", value=str(self.annotated)),
                   KeyValue(key="undrawable images", value=str(self.undrawable)),
                   KeyValue(key="last error", value=self._last_error)]
        status = DiagnosticStatus(
            name=f"{self.get_fully_qualified_name()}: inputs", hardware_id=self.get_fully_qualified_name(), values=values,
            level=DiagnosticStatus.WARN if stale else DiagnosticStatus.OK,
            message=f"no recent {', '.join(stale)}" if stale else "inputs fresh",
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)


def main(args: list[str] | None = None) -> int:
    return spin_node(MonitorNode, args)


if __name__ == "__main__":
    sys.exit(main())
