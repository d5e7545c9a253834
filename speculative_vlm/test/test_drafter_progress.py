"""The drafter's prompts carry the progress line: odometry since the instruction, over real DDS."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
import rclpy
from go2_harness import Spinner
from nav_msgs.msg import Odometry
from polling import wait_for
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image

pytestmark = pytest.mark.ros


def odom(x: float, y: float, yaw: float) -> Odometry:
    msg = Odometry()
    msg.pose.pose.position.x, msg.pose.pose.position.y = x, y
    msg.pose.pose.orientation.z, msg.pose.pose.orientation.w = math.sin(yaw / 2), math.cos(yaw / 2)
    return msg


def grey_frame() -> Image:
    frame = Image(height=24, width=32, encoding="bgr8", step=32 * 3)
    frame.data = np.full((24, 32, 3), 128, np.uint8).tobytes()
    return frame


@pytest.fixture
def drafter(rclpy_context):
    from speculative_vlm.nodes.drafter import DrafterNode

    namespace = f"t{uuid.uuid4().hex[:8]}"
    node = DrafterNode(namespace=namespace,
                       parameter_overrides=[Parameter("draft_model", value="/nonexistent/draft")])
    pub_node = rclpy.create_node("odom_source", namespace=namespace)
    pub = pub_node.create_publisher(Odometry, "odom", 10)
    spinner = Spinner(node, pub_node)
    yield node, pub
    spinner.shutdown()
    node.destroy_node()
    pub_node.destroy_node()


def publish_until(pub, msg: Odometry, seen) -> None:
    assert wait_for(lambda: (pub.publish(msg), seen())[1], 10.0, step=0.05)


def test_the_prompt_says_how_far_the_robot_moved_and_turned_since_the_goal_began(drafter):
    node, pub = drafter
    publish_until(pub, odom(1.0, 1.0, math.pi / 2), lambda: node._pose is not None)
    node._start_progress()
    publish_until(pub, odom(1.3, 2.2, math.pi / 2 + math.radians(30)),
                  lambda: node._progress.forward > 1.0)
    with node._odom_lock:
        node._last_action = "move"
    prompt = node.request_for("walk forward 2 meters", grey_frame(), node._progress_text()).prompt
    assert prompt.splitlines()[-1] == ("Progress: moved 1.2 m forward and 0.3 m to the right, turned 30 degrees "
                                       "to the left; last command: move")


def test_without_odometry_or_with_the_line_off_the_prompt_has_no_progress(drafter):
    node, pub = drafter
    node._start_progress()  # no odometry yet
    assert node._progress_text() == ""
    publish_until(pub, odom(0.0, 0.0, 0.0), lambda: node._pose is not None)
    node._start_progress()
    assert node._progress_text().startswith("moved 0.0 m forward")
    node.set_parameters([Parameter("progress_line", value=False)])
    assert "Progress" not in node.request_for("sit", grey_frame(), node._progress_text()).prompt
