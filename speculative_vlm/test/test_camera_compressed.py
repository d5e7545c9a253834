"""camera/image_raw/compressed: the Go2's JPEG passed through, other frames encoded, always the
same image (size, stamp, frame) as camera/image_raw."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from camera_harness import CameraRig
from go2_harness import SimProcess, join_domain
from polling import wait_for
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from speculative_vlm.nodes.image_conversion import image_to_numpy, numpy_to_image

pytestmark = pytest.mark.ros


def pairs(rig: CameraRig, compressed: list[CompressedImage]) -> list[tuple[Image, CompressedImage]]:
    """(raw, compressed) pairs of the same frame, matched by stamp."""
    raw = {(m.header.stamp.sec, m.header.stamp.nanosec): m for m in rig.images}
    return [(raw[k], c) for c in compressed if (k := (c.header.stamp.sec, c.header.stamp.nanosec)) in raw]


def subscribe(rig: CameraRig) -> list[CompressedImage]:
    received: list[CompressedImage] = []
    rig.probe.create_subscription(CompressedImage, "camera/image_raw/compressed", received.append,
                                  qos_profile_sensor_data)
    assert wait_for(lambda: rig.node._compressed_pub.get_subscription_count() > 0, 15.0)
    return received


def decode(msg: CompressedImage) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR)


def test_the_go2_jpeg_passes_through_unchanged_when_the_frame_keeps_its_size(ros):  # noqa: F811
    sim = SimProcess("--width", "160", "--height", "120")
    rig = CameraRig(source="go2_video", dds_domain_id=join_domain(), rate_hz=10.0)
    try:
        compressed = subscribe(rig)
        assert wait_for(lambda: len(pairs(rig, compressed)) >= 2, 10.0), "no compressed frames"
        raw, jpeg = pairs(rig, compressed)[-1]
        assert jpeg.format == "jpeg" and jpeg.header.frame_id == raw.header.frame_id
        assert bytes(jpeg.data[:2]) == b"\xff\xd8"
        # image_raw was decoded from these very bytes: a re-encode would not decode to it exactly.
        same = np.array_equal(decode(jpeg), image_to_numpy(raw))
        assert same, "the robot's JPEG was re-encoded"
    finally:
        rig.close()
        sim.stop()


def test_a_resized_go2_frame_is_encoded_at_the_published_size(ros):  # noqa: F811
    sim = SimProcess("--width", "160", "--height", "120")
    rig = CameraRig(source="go2_video", dds_domain_id=join_domain(), rate_hz=10.0, width=80, height=60)
    try:
        compressed = subscribe(rig)
        assert wait_for(lambda: pairs(rig, compressed), 10.0), "no compressed frames"
        raw, jpeg = pairs(rig, compressed)[-1]
        image = decode(jpeg)
        assert image.shape == (60, 80, 3)
        assert np.abs(image.astype(int) - image_to_numpy(raw).astype(int)).mean() < 4.0
    finally:
        rig.close()
        sim.stop()


def test_frames_from_an_image_topic_are_encoded_as_jpeg(ros):  # noqa: F811
    rig = CameraRig(source="topic", input_topic="image_in", rate_hz=50.0)
    pub = rig.probe.create_publisher(Image, "image_in", qos_profile_sensor_data)
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[:, 32:] = (0, 0, 255)  # right half red
    try:
        compressed = subscribe(rig)
        assert wait_for(lambda: pub.get_subscription_count() > 0, 15.0)

        def fed() -> bool:
            pub.publish(numpy_to_image(bgr, "bgr8"))
            return bool(pairs(rig, compressed))

        assert wait_for(fed, 10.0, step=0.05), "no compressed frames"
        raw, jpeg = pairs(rig, compressed)[-1]
        assert jpeg.format == "jpeg"
        image = decode(jpeg)
        assert image.shape == (48, 64, 3)
        assert np.abs(image.astype(int) - image_to_numpy(raw).astype(int)).mean() < 4.0
    finally:
        rig.close()
