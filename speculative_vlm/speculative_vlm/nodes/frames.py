"""The coordinate frames the nodes publish: the transforms and the topics they go on.

- ``base_link -> <camera frame>``: where the camera is mounted (the camera node, once, on
  ``tf_static``). The mounting pose is given as one measures it, x forward / y left / z up
  and roll/pitch/yaw of the camera's viewing direction (all zero: looking straight ahead);
  the child frame is the camera's *optical* frame (z forward, x right, y down), the frame
  ``sensor_msgs/Image`` and ``CameraInfo`` are expressed in.
- ``odom -> base_link``: the robot's pose from its own odometry (the motion node, on ``tf``).

Topic names are relative (``tf``, ``tf_static``), so a namespaced robot gets its own tree and
a launch file can remap them to ``/tf`` and ``/tf_static`` as usual. The messages are built
here from ``geometry_msgs`` alone; ``tf2_msgs/TFMessage``, the envelope, is part of every
ROS 2 install but not among the PyPI wheels, so the nodes publish only where it imports.
"""

from __future__ import annotations

import math

from builtin_interfaces.msg import Time
from geometry_msgs.msg import Quaternion, TransformStamped
from nav_msgs.msg import Odometry
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

try:  # part of every ROS 2 install, but not among the PyPI wheels
    from tf2_msgs.msg import TFMessage
except ImportError:
    TFMessage = None

TF_TOPIC = "tf"
TF_STATIC_TOPIC = "tf_static"
# tf2_ros' StaticTransformBroadcaster QoS: a late listener still gets the mounting.
TF_STATIC_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)

Quat = tuple[float, float, float, float]  # (x, y, z, w)


def quaternion_from_rpy(roll: float, pitch: float, yaw: float) -> Quat:
    """Fixed-axis roll, then pitch, then yaw (REP 103, tf2's setRPY), as (x, y, z, w)."""
    cr, sr = math.cos(roll / 2), math.sin(roll / 2)
    cp, sp = math.cos(pitch / 2), math.sin(pitch / 2)
    cy, sy = math.cos(yaw / 2), math.sin(yaw / 2)
    return (
        sr * cp * cy - cr * sp * sy,
        cr * sp * cy + sr * cp * sy,
        cr * cp * sy - sr * sp * cy,
        cr * cp * cy + sr * sp * sy,
    )


def quaternion_multiply(a: Quat, b: Quat) -> Quat:
    """The rotation ``a`` followed, in ``a``'s frame, by ``b`` (Hamilton product a * b)."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return (
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
        aw * bw - ax * bx - ay * by - az * bz,
    )


# A camera body frame (x forward) to its optical frame (z forward, x right, y down).
BODY_TO_OPTICAL = quaternion_from_rpy(-math.pi / 2, 0.0, -math.pi / 2)


def camera_mount_transform(
    parent: str, child: str, xyz: tuple[float, float, float], rpy: tuple[float, float, float], stamp: Time
) -> TransformStamped:
    """``parent -> child`` for a camera mounted at ``xyz`` looking along ``rpy``; child is optical."""
    t = TransformStamped()
    t.header.stamp, t.header.frame_id, t.child_frame_id = stamp, parent, child
    t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = (float(v) for v in xyz)
    x, y, z, w = quaternion_multiply(quaternion_from_rpy(*rpy), BODY_TO_OPTICAL)
    t.transform.rotation = Quaternion(x=x, y=y, z=z, w=w)
    return t


def odom_transform(odom: Odometry) -> TransformStamped:
    """``odom.header.frame_id -> odom.child_frame_id`` at the odometry's pose and stamp."""
    t = TransformStamped(header=odom.header, child_frame_id=odom.child_frame_id)
    p = odom.pose.pose.position
    t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = p.x, p.y, p.z
    t.transform.rotation = odom.pose.pose.orientation
    return t
