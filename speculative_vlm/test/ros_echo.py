"""Helper process for the message round-trip test: echoes every message from in/<T> to out/<T>."""

import sys

import rclpy
from rclpy.node import Node

from speculative_vlm_msgs.action import Instruct
from speculative_vlm_msgs.msg import DecodingStats, DraftBlock, LocomotionCommand, Verdict

TYPES = {
    "LocomotionCommand": LocomotionCommand,
    "DraftBlock": DraftBlock,
    "Verdict": Verdict,
    "DecodingStats": DecodingStats,
    "InstructFeedback": Instruct.Feedback,
}


def main() -> None:
    rclpy.init()
    node = Node("ros_echo")
    pubs = {}
    subs = []
    for name, msg_type in TYPES.items():
        pubs[name] = node.create_publisher(msg_type, f"out/{name}", 10)
        subs.append(node.create_subscription(msg_type, f"in/{name}", pubs[name].publish, 10))
    print("ready", flush=True)
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
