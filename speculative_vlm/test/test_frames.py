"""Coordinate frames: the camera's mounting on tf_static, odom -> base_link on tf, odometry covariance.

tf2_msgs (the TFMessage envelope) is not among the PyPI wheels, so the publishing itself is
untested here; the transforms are built by plain functions and checked as geometry.
"""

from __future__ import annotations

import math
import uuid

import pytest
from builtin_interfaces.msg import Time
from go2_harness import MotionRig
from nav_msgs.msg import Odometry
from polling import wait_for
from rclpy.node import Node
from rclpy.parameter import Parameter
from speculative_vlm.nodes.frames import (
    TF_STATIC_TOPIC,
    TF_TOPIC,
    camera_mount_transform,
    odom_transform,
    quaternion_from_rpy,
)

pytestmark = pytest.mark.ros


def rotate(q, v: tuple[float, float, float]) -> tuple[float, float, float]:
    """v rotated by the unit quaternion q (x, y, z, w): v' = v + 2w(u x v) + 2u x (u x v)."""
    x, y, z, w = (q.x, q.y, q.z, q.w) if hasattr(q, "w") else q
    u = (x, y, z)

    def cross(a, b):
        return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])

    t = tuple(2 * c for c in cross(u, v))
    ut = cross(u, t)
    return tuple(v[i] + w * t[i] + ut[i] for i in range(3))


def approx(v) -> list:
    return [pytest.approx(c, abs=1e-9) for c in v]


def test_a_camera_mounted_looking_ahead_has_its_optical_axis_along_base_x():
    t = camera_mount_transform("base_link", "front_camera", (0.3, 0.0, 0.05), (0.0, 0.0, 0.0), Time(sec=5))
    assert (t.header.frame_id, t.child_frame_id, t.header.stamp.sec) == ("base_link", "front_camera", 5)
    assert (t.transform.translation.x, t.transform.translation.y, t.transform.translation.z) == (0.3, 0.0, 0.05)
    q = t.transform.rotation
    assert list(rotate(q, (0, 0, 1))) == approx((1, 0, 0))  # optical z (viewing direction) = forward
    assert list(rotate(q, (1, 0, 0))) == approx((0, -1, 0))  # optical x (image right) = robot's right
    assert list(rotate(q, (0, 1, 0))) == approx((0, 0, -1))  # optical y (image down) = down


def test_a_positive_mount_pitch_looks_down_and_a_yaw_looks_sideways():
    pitch = 0.4
    q = camera_mount_transform("base_link", "cam", (0, 0, 0), (0.0, pitch, 0.0), Time()).transform.rotation
    assert list(rotate(q, (0, 0, 1))) == approx((math.cos(pitch), 0, -math.sin(pitch)))
    q = camera_mount_transform("base_link", "cam", (0, 0, 0), (0.0, 0.0, math.pi / 2), Time()).transform.rotation
    assert list(rotate(q, (0, 0, 1))) == approx((0, 1, 0))  # yaw +90 deg: looking left


def test_rpy_follows_ros_convention_yaw_about_z_after_pitch_about_y_after_roll_about_x():
    q = quaternion_from_rpy(0.0, 0.0, 0.7)
    assert q == pytest.approx((0.0, 0.0, math.sin(0.35), math.cos(0.35)))
    q = quaternion_from_rpy(0.3, 0.0, 0.0)
    assert q == pytest.approx((math.sin(0.15), 0.0, 0.0, math.cos(0.15)))


def test_tf_topics_are_relative_so_a_namespace_applies(rclpy_context):
    assert (TF_TOPIC, TF_STATIC_TOPIC) == ("tf", "tf_static")
    node = Node("frames_probe", namespace="/robot2")
    try:
        assert node.resolve_topic_name(TF_TOPIC) == "/robot2/tf"
        assert node.resolve_topic_name(TF_STATIC_TOPIC) == "/robot2/tf_static"
    finally:
        node.destroy_node()


def test_the_camera_node_mounts_its_frame_on_base_link_from_its_parameters(ros):
    from speculative_vlm.nodes.camera import CameraNode

    node = CameraNode(namespace="/t" + uuid.uuid4().hex[:8], parameter_overrides=[
        Parameter("source", value="topic"), Parameter("frame_id", value="head_cam"),
        Parameter("mount_x", value=0.25), Parameter("mount_z", value=0.1), Parameter("mount_pitch", value=0.2),
    ])
    try:
        t = node.mount_transform()
        assert (t.header.frame_id, t.child_frame_id) == ("base_link", "head_cam")
        assert (t.transform.translation.x, t.transform.translation.z) == (0.25, 0.1)
        assert list(rotate(t.transform.rotation, (0, 0, 1))) == approx((math.cos(0.2), 0, -math.sin(0.2)))
        assert t.header.stamp.sec > 0
    finally:
        node.destroy_node()


def test_odom_to_base_link_is_the_odometry_pose():
    odom = Odometry(child_frame_id="base_link")
    odom.header.frame_id, odom.header.stamp = "odom", Time(sec=3, nanosec=7)
    odom.pose.pose.position.x, odom.pose.pose.position.y = 1.5, -0.25
    odom.pose.pose.orientation.z, odom.pose.pose.orientation.w = math.sin(0.3), math.cos(0.3)
    t = odom_transform(odom)
    assert (t.header.frame_id, t.child_frame_id, t.header.stamp) == ("odom", "base_link", odom.header.stamp)
    assert (t.transform.translation.x, t.transform.translation.y) == (1.5, -0.25)
    assert t.transform.rotation == odom.pose.pose.orientation


@pytest.fixture
def rig(go2_world):
    r = MotionRig(go2_world, pose_covariance_diagonal=[0.02, 0.02, 0.05, 0.001, 0.001, 0.03])
    yield r
    r.close()


def test_odometry_carries_the_configured_pose_and_twist_covariance(rig):
    assert wait_for(lambda: len(rig.odom) > 2, 10.0), "no odometry"
    odom = rig.odom[-1]
    assert [odom.pose.covariance[7 * i] for i in range(6)] == pytest.approx([0.02, 0.02, 0.05, 0.001, 0.001, 0.03])
    assert all(odom.twist.covariance[7 * i] > 0 for i in range(6)), "twist covariance is zero (certainty)"
    off_diagonal = [c for k, c in enumerate(odom.pose.covariance) if k % 7]
    assert not any(off_diagonal)


def test_a_covariance_diagonal_without_six_variances_is_refused(rig):
    result = rig.node.set_parameters([Parameter("twist_covariance_diagonal", value=[0.1, 0.1])])[0]
    assert not result.successful and "6 finite variances" in result.reason
    result = rig.node.set_parameters([Parameter("twist_covariance_diagonal", value=[0.1, 0.1, 0.1, 0.1, 0.1, -1.0])])[0]
    assert not result.successful
