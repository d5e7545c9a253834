"""The camera node: frames from the simulated Go2's video service, an image topic, a video file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from camera_harness import CameraRig
from go2_harness import SimProcess, assert_parameter_file_matches, join_domain, write_clip
from polling import wait_for
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from speculative_vlm.nodes.camera import CameraNode, CameraSourceError
from speculative_vlm.nodes.image_conversion import image_to_numpy, numpy_to_image

pytestmark = pytest.mark.ros


def test_frames_from_the_go2_video_service_arrive_as_bgr8_images_of_the_requested_size(ros):
    sim = SimProcess("--width", "640", "--height", "480")
    rig = CameraRig(
        source="go2_video", dds_domain_id=join_domain(), rate_hz=10.0, width=320, height=240
    )
    try:
        assert wait_for(lambda: len(rig.images) >= 3 and rig.infos, 10.0), "no frames from the video service"
        img = rig.images[-1]
        assert (img.encoding, img.width, img.height, img.step) == ("bgr8", 320, 240, 960)
        assert len(img.data) == 320 * 240 * 3
        assert img.header.frame_id == "front_camera"
        info = rig.infos[-1]
        assert (info.width, info.height) == (320, 240)
        assert info.k[0] == pytest.approx(160.0 / np.tan(np.radians(45.0)))
        # The default scene's red ball is ahead-left: red pixels sit left of the centre.
        bgr = image_to_numpy(img)
        red = (bgr[:, :, 2] > 150) & (bgr[:, :, 1] < 80) & (bgr[:, :, 0] < 80)
        assert red.sum() > 20
        assert np.nonzero(red)[1].mean() < 160
    finally:
        rig.close()
        sim.stop()


def test_a_corrupt_jpeg_is_skipped_and_counted(ros):
    sim = SimProcess("--width", "160", "--height", "120", "--corrupt-every", "2")
    rig = CameraRig(source="go2_video", dds_domain_id=join_domain(), rate_hz=20.0, diagnostics_period_s=0.2)
    try:
        assert wait_for(lambda: rig.node.undecodable >= 2 and len(rig.images) >= 2, 10.0)
        assert all(len(i.data) == i.step * i.height and i.width == 160 for i in rig.images)
        assert abs(rig.node.undecodable - rig.node.published) <= 1  # every second frame was broken
        assert wait_for(
            lambda: any(
                int({kv.key: kv.value for kv in s.values}["undecodable"]) > 0
                for a in rig.diagnostics
                for s in a.status
                if s.name == f"{rig.ns}/camera: frames"
            ),
            3.0,
        ), "undecodable frames not reported in diagnostics"
    finally:
        rig.close()
        sim.stop()


def test_an_image_topic_is_republished_as_bgr8_at_the_requested_size(ros):
    rig = CameraRig(source="topic", input_topic="image_in", width=32, height=24, rate_hz=50.0)
    pub = rig.probe.create_publisher(Image, "image_in", qos_profile_sensor_data)
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:, :, 0] = 255  # pure red in RGB
    try:
        assert wait_for(lambda: pub.get_subscription_count() > 0, 15.0)

        def publish_and_check() -> bool:
            pub.publish(numpy_to_image(rgb, "rgb8"))
            return bool(rig.images)

        assert wait_for(publish_and_check, 10.0, step=0.05)
        out = image_to_numpy(rig.images[-1])
        assert out.shape == (24, 32, 3) and rig.images[-1].encoding == "bgr8"
        assert (out[:, :, 2] == 255).all() and (out[:, :, :2] == 0).all()
    finally:
        rig.close()


def test_a_video_file_is_published_frame_by_frame(ros, tmp_path):
    path = str(tmp_path / "clip.avi")
    write_clip(path, frames=5, width=64, height=48, step=40)
    rig = CameraRig(source="file", video_path=path, rate_hz=30.0)
    try:
        assert wait_for(lambda: len(rig.images) >= 7, 10.0), (
            f"file frames not published (or not looped): received {len(rig.images)}, "
            f"published {rig.node.published}, undecodable {rig.node.undecodable}, last error {rig.node._last_error!r}"
        )
        assert (rig.images[0].width, rig.images[0].height) == (64, 48)
    finally:
        rig.close()


def test_an_unknown_source_is_refused_with_the_valid_choices(ros):
    with pytest.raises(CameraSourceError, match="go2_video"):
        CameraNode(parameter_overrides=[Parameter("source", value="webcam")])


def test_the_shipped_parameter_file_sets_exactly_the_declared_parameters(ros):
    # source=topic: the same keys, but no robot connection for this check
    assert_parameter_file_matches(CameraNode, Path(__file__).parents[1] / "config" / "camera.yaml", "camera",
                                  source="topic")
