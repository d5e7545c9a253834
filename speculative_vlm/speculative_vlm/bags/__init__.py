"""rosbag2 MCAP bags without rosbag2: record topics of a live graph and play bags back.

Bags are written and read with `rosbags`; messages stay CDR bytes end to end (rclpy
subscribes and publishes them raw), so any type rclpy knows can be recorded and replayed.
The type definitions stored in a bag come from the installed interface files, so other
tools (`ros2 bag`, Foxglove, rosbags) can decode every message, ours included.

In-process use (the node must be spun by an executor for recording; playing only publishes)::

    with BagRecorder(node, "run1", ["/camera/image_raw", "/motion/command"]):
        ...                                   # spin; close() writes metadata.yaml
    player = BagPlayer(node, "run1", rate=2.0, wait_for_subscribers_s=5.0)
    player.start(); player.wait()             # or player.play() to block; player.report
"""

from speculative_vlm.bags.player import BagNotFound, BagPlayer, PlaybackReport
from speculative_vlm.bags.recorder import BagExists, BagRecorder
from speculative_vlm.bags.typestore import UnknownMessageType, installed_typestore

__all__ = [
    "BagExists", "BagNotFound", "BagPlayer", "BagRecorder", "PlaybackReport", "UnknownMessageType",
    "installed_typestore",
]
