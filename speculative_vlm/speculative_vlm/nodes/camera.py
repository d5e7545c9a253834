"""The camera node: one image stream for the drafter, from whatever camera the robot has.

Sources (parameter ``source``):
- ``go2_video``: JPEG frames from the Go2's ``videohub`` service through unitree_sdk2py's
  VideoClient (the real robot or the simulated one);
- ``topic``: an existing ``sensor_msgs/Image`` topic (``input_topic``), re-published at
  ``rate_hz`` and resized;
- ``file``: a video file or a device (``video_path``: a path, ``/dev/videoN`` or an index)
  through OpenCV.
Publishes ``camera/image_raw`` (bgr8), ``camera/camera_info`` and ``camera/image_raw/compressed``
(sensor_msgs/CompressedImage, "jpeg", the image_transport name Foxglove and rqt read) with
sensor-data QoS. The Go2's video service already delivers JPEG: when the frame is published at
its own size those bytes pass through unchanged; a resized frame, or one from another source,
is encoded here (``jpeg_quality``), and only while someone subscribes. Also publishes
``/diagnostics`` (frames published, frames that could not be decoded, last error), and once, on
``tf_static`` (where tf2_msgs is installed), where the camera is mounted: ``base_frame ->
frame_id`` from the ``mount_*`` parameters (see :mod:`speculative_vlm.nodes.frames`).
Frames that cannot be decoded are counted and skipped, never published.
Grabbing runs on its own thread: a slow camera never blocks the executor.
"""

from __future__ import annotations

import math
import sys
import threading
import time

import cv2
import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TransformStamped
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from speculative_vlm.go2.dds import MAX_DOMAIN_ID
from speculative_vlm.go2.sdk_backend import VideoBackend, code_name
from speculative_vlm.nodes.frames import TF_STATIC_QOS, TF_STATIC_TOPIC, TFMessage, camera_mount_transform
from speculative_vlm.nodes.image_conversion import ImageConversionError, image_to_numpy, numpy_to_image
from speculative_vlm.nodes.parameters import (
    float_range,
    int_range,
    on_parameters_set,
    set_timer_period,
    start_only,
)
from speculative_vlm.nodes.spin import spin_node

SOURCES = ("go2_video", "topic", "file")


class CameraSourceError(RuntimeError):
    """The configured source cannot deliver frames; the message says what to fix."""


def _to_bgr(array: np.ndarray, encoding: str) -> np.ndarray:
    if encoding in ("bgr8", "8UC3"):
        return array
    if encoding == "rgb8":
        return cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if encoding == "bgra8":
        return cv2.cvtColor(array, cv2.COLOR_BGRA2BGR)
    if encoding == "rgba8":
        return cv2.cvtColor(array, cv2.COLOR_RGBA2BGR)
    if encoding in ("mono8", "8UC1"):
        return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    if encoding in ("mono16", "16UC1"):
        return cv2.cvtColor((array >> 8).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    raise ImageConversionError(f"cannot show {encoding} as a colour image")


class CameraNode(Node):
    """Publishes camera/image_raw + camera/camera_info from the configured source."""

    def __init__(self, **kwargs) -> None:
        super().__init__("camera", **kwargs)
        d = self.declare_parameter
        d("source", "go2_video", start_only(f"Frame source, one of {SOURCES}"))
        d("rate_hz", 10.0, float_range(0.1, 60.0, "Published frame rate, Hz"))
        d("width", 0, int_range(0, 8192, "Output width in pixels; 0 keeps the source's"))
        d("height", 0, int_range(0, 8192, "Output height in pixels; 0 keeps the source's"))
        d("jpeg_quality", 90, int_range(1, 100, "JPEG quality of camera/image_raw/compressed when a frame is "
                                        "encoded here (the Go2's own JPEG passes through unchanged)"))
        d("hfov_deg", 90.0, float_range(10.0, 170.0, "Horizontal field of view, for CameraInfo intrinsics"))
        d("frame_id", "front_camera", start_only(
            "frame_id of published images: the camera's optical frame (z forward, x right, y down), "
            "published on tf_static as a child of base_frame"))
        d("base_frame", "base_link", start_only("The robot frame the camera is mounted on"))
        # The Go2's front camera sits at the front of the head, looking ahead (measure yours).
        for axis, value in (("x", 0.3), ("y", 0.0), ("z", 0.05)):
            d(f"mount_{axis}", value, float_range(-2.0, 2.0, f"Camera position in base_frame, {axis}, m", read_only=True))
        for angle in ("roll", "pitch", "yaw"):
            d(f"mount_{angle}", 0.0, float_range(
                -math.pi, math.pi, f"Camera viewing direction in base_frame, {angle}, rad (0: straight ahead; "
                "positive pitch looks down)", read_only=True))
        d("input_topic", "image_in", start_only("Image topic read when source is 'topic'"))
        d("video_path", "", start_only("File, /dev/videoN or device index when source is 'file'"))
        d("loop_video", True, start_only("Restart a video file at its end"))
        d("network_interface", "lo", start_only("DDS interface for go2_video ('lo' for the sim)"))
        d("dds_domain_id", 0, int_range(0, MAX_DOMAIN_ID, "DDS domain of the Go2 (the robot uses 0)", read_only=True))
        d("sdk_timeout_s", 1.0, float_range(0.05, 10.0, "Timeout of one GetImageSample request, s", read_only=True))
        d("diagnostics_period_s", 1.0, float_range(0.1, 10.0, "Period of /diagnostics messages, s"))

        self._source = self.get_parameter("source").value
        if self._source not in SOURCES:
            raise CameraSourceError(f"source {self._source!r} is not one of {SOURCES}")
        self._image_pub = self.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
        self._info_pub = self.create_publisher(CameraInfo, "camera/camera_info", qos_profile_sensor_data)
        self._compressed_pub = self.create_publisher(
            CompressedImage, "camera/image_raw/compressed", qos_profile_sensor_data)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        if TFMessage is not None:  # every ROS 2 install; not among the PyPI wheels
            self._tf_static_pub = self.create_publisher(TFMessage, TF_STATIC_TOPIC, TF_STATIC_QOS)
            self._tf_static_pub.publish(TFMessage(transforms=[self.mount_transform()]))
        self.published = 0
        self.undecodable = 0
        self.source_errors = 0
        self._last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_topic_frame = 0.0
        self._diag_timer = self.create_timer(self.get_parameter("diagnostics_period_s").value, self._publish_diagnostics)
        # rate_hz, size and field of view are read on every frame; the diagnostics timer is told.
        on_parameters_set(self, self._on_parameters_set)
        if self._source == "topic":
            self.create_subscription(Image, self.get_parameter("input_topic").value, self._on_image, qos_profile_sensor_data)
        else:
            self._thread = threading.Thread(target=self._grab_loop, name="camera_grab", daemon=True)
            self._thread.start()

    def mount_transform(self) -> TransformStamped:
        """``base_frame -> frame_id`` from the mounting parameters (published once, on tf_static)."""
        p = self.get_parameter
        return camera_mount_transform(
            p("base_frame").value, p("frame_id").value,
            tuple(p(f"mount_{a}").value for a in "xyz"), tuple(p(f"mount_{a}").value for a in ("roll", "pitch", "yaw")),
            self.get_clock().now().to_msg(),
        )

    def _on_parameters_set(self, values: dict[str, object]) -> None:
        if "diagnostics_period_s" in values:
            set_timer_period(self._diag_timer, values["diagnostics_period_s"])

    # ---- sources ------------------------------------------------------------------
    def _grab_loop(self) -> None:
        try:
            grab = self._open_go2() if self._source == "go2_video" else self._open_file()
        except Exception as exc:  # reported in diagnostics; the node stays up
            self._last_error = str(exc)
            self.get_logger().error(f"camera source {self._source!r} failed: {exc}")
            return
        next_t = time.monotonic()
        while not self._stop.is_set():
            grabbed = grab()
            if grabbed is not None:
                frame, jpeg = grabbed
                self._publish(frame, self.get_clock().now().to_msg(), jpeg)
            # Read every frame, so that a rate set at run time applies at once.
            next_t = max(next_t + 1.0 / self.get_parameter("rate_hz").value, time.monotonic())
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def _open_go2(self):
        video = VideoBackend(
            self.get_parameter("dds_domain_id").value,
            self.get_parameter("network_interface").value,
            self.get_parameter("sdk_timeout_s").value,
        )

        def grab() -> tuple[np.ndarray, bytes] | None:
            code, jpeg = video.get_jpeg()
            if code != 0:
                self.source_errors += 1
                self._last_error = f"GetImageSample -> {code} ({code_name(code)})"
                return None
            frame = self._decode(jpeg)
            return None if frame is None else (frame, bytes(jpeg))

        return grab

    def _open_file(self):
        path = self.get_parameter("video_path").value
        if not path:
            raise CameraSourceError("source 'file' needs video_path (a file, /dev/videoN or a device index)")
        capture = cv2.VideoCapture(int(path) if path.isdigit() else path)
        if not capture.isOpened():
            raise CameraSourceError(f"OpenCV cannot open {path!r}; check the path or device permissions")
        loop = self.get_parameter("loop_video").value

        def grab() -> tuple[np.ndarray, None] | None:
            ok, frame = capture.read()
            if not ok and loop and not path.isdigit() and not path.startswith("/dev/"):
                capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = capture.read()
            if not ok or frame is None:
                self.undecodable += 1
                self._last_error = f"no frame from {path!r}"
                return None
            return frame, None

        return grab

    def _decode(self, jpeg: bytes) -> np.ndarray | None:
        frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) if jpeg else None
        if frame is None:
            self.undecodable += 1
            self._last_error = f"undecodable frame ({len(jpeg)} bytes)"
            return None
        return frame

    def _on_image(self, msg: Image) -> None:
        now = time.monotonic()
        if now - self._last_topic_frame < 1.0 / self.get_parameter("rate_hz").value:
            return
        try:
            frame = _to_bgr(image_to_numpy(msg), msg.encoding)
        except ImageConversionError as exc:
            self.undecodable += 1
            self._last_error = str(exc)
            return
        self._last_topic_frame = now
        self._publish(frame, msg.header.stamp)

    # ---- outputs ------------------------------------------------------------------
    def _publish(self, frame: np.ndarray, stamp, jpeg: bytes | None = None) -> None:
        """Publish one frame; ``jpeg`` is the source's own encoding of it (Go2 video), if any."""
        w, h = self.get_parameter("width").value, self.get_parameter("height").value
        if w and h and (frame.shape[1], frame.shape[0]) != (w, h):
            frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
            jpeg = None  # no longer this frame's encoding
        header = Header(stamp=stamp, frame_id=self.get_parameter("frame_id").value)
        self._image_pub.publish(numpy_to_image(frame, "bgr8", header))
        self._info_pub.publish(self._camera_info(header, frame.shape[1], frame.shape[0]))
        if self._compressed_pub.get_subscription_count() > 0:  # encoding costs CPU: only for a listener
            try:
                self._compressed_pub.publish(self._compressed(frame, header, jpeg))
            except ImageConversionError as exc:  # the raw image is out; report, do not stop grabbing
                self._last_error = str(exc)
        self.published += 1

    def _compressed(self, frame: np.ndarray, header: Header, jpeg: bytes | None) -> CompressedImage:
        """The frame as JPEG: the robot's bytes as they came when the frame is unchanged, else encoded."""
        if jpeg is None:
            ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.get_parameter("jpeg_quality").value])
            if not ok:
                raise ImageConversionError(f"OpenCV could not encode a {frame.shape} frame as JPEG")
            jpeg = encoded.tobytes()
        msg = CompressedImage(header=header, format="jpeg")
        msg.data = jpeg  # assigned, not passed to the constructor, which copies byte by byte
        return msg

    def _camera_info(self, header: Header, width: int, height: int) -> CameraInfo:
        f = (width / 2.0) / math.tan(math.radians(self.get_parameter("hfov_deg").value) / 2.0)
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        info = CameraInfo(header=header, width=width, height=height, distortion_model="plumb_bob")
        info.d = [0.0] * 5
        info.k = [f, 0.0, cx, 0.0, f, cy, 0.0, 0.0, 1.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.p = [f, 0.0, cx, 0.0, 0.0, f, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
        return info

    def _publish_diagnostics(self) -> None:
        # Named after this node, so two namespaced robots' cameras are told apart.
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: frames", hardware_id=f"camera:{self._source}")
        if self.published == 0:
            status.level = DiagnosticStatus.ERROR if self._last_error else DiagnosticStatus.WARN
            status.message = self._last_error or "no frame yet"
        elif self.undecodable or self.source_errors:
            status.level = DiagnosticStatus.WARN
            status.message = f"{self.undecodable} undecodable frame(s) skipped; last: {self._last_error}"
        else:
            status.level, status.message = DiagnosticStatus.OK, "streaming"
        status.values = [
            KeyValue(key="published", value=str(self.published)),
            KeyValue(key="undecodable", value=str(self.undecodable)),
            KeyValue(key="source_errors", value=str(self.source_errors)),
        ]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def destroy_node(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return spin_node(CameraNode, args)


if __name__ == "__main__":
    sys.exit(main())
