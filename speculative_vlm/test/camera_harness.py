"""A camera node under test with a probe on its topics (test_camera_node, test_camera_compressed)."""

from __future__ import annotations

import uuid

from diagnostic_msgs.msg import DiagnosticArray
from go2_harness import Spinner
from polling import wait_for
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from speculative_vlm.nodes.camera import CameraNode


class CameraRig:
    def __init__(self, **params) -> None:
        self.ns = "/t" + uuid.uuid4().hex[:8]
        self.node = CameraNode(
            namespace=self.ns, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()]
        )
        self.probe = Node("probe", namespace=self.ns)
        self.images: list[Image] = []
        self.infos: list[CameraInfo] = []
        self.diagnostics: list[DiagnosticArray] = []
        self.probe.create_subscription(Image, "camera/image_raw", self.images.append, qos_profile_sensor_data)
        self.probe.create_subscription(CameraInfo, "camera/camera_info", self.infos.append, qos_profile_sensor_data)
        self.probe.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        # An executor per rig: nodes added to and removed from a long-running executor
        # were seen to stop receiving under load.
        self.spinner = Spinner()
        self.spinner.add(self.node)
        self.spinner.add(self.probe)
        assert wait_for(lambda: self.node._image_pub.get_subscription_count() > 0, 15.0), "probe never matched"

    def close(self) -> None:
        self.spinner.shutdown()
        self.node.destroy_node()
        self.probe.destroy_node()
