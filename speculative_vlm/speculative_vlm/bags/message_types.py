"""The rclpy class of a ROS 2 type name, for raw subscriptions and publishers."""

from __future__ import annotations

import importlib

from speculative_vlm.bags.typestore import UnknownMessageType


def rclpy_class(msgtype: str) -> type:
    """`'sensor_msgs/msg/Image'` -> `sensor_msgs.msg.Image`; UnknownMessageType if not importable."""
    parts = msgtype.split("/")
    if len(parts) != 3:
        raise UnknownMessageType(f"{msgtype!r} is not a full ROS 2 type name; expected 'package/msg/Name'")
    package, kind, name = parts
    try:
        return getattr(importlib.import_module(f"{package}.{kind}"), name)
    except (ImportError, AttributeError) as exc:
        raise UnknownMessageType(
            f"rclpy cannot load {msgtype}: build and source the package {package!r} ({exc})"
        ) from exc
