"""rosbag2 MCAP bags without rosbag2: record topics of a live graph and play bags back.

Bags are written and read with `rosbags`; messages stay CDR bytes end to end (rclpy
subscribes and publishes them raw), so any type rclpy knows can be recorded and replayed.
The type definitions stored in a bag come from the installed interface files, so other
tools (`ros2 bag`, Foxglove, rosbags) can decode every message, ours included.
"""

from speculative_vlm.bags.player import BagPlayer, PlaybackReport
from speculative_vlm.bags.recorder import BagRecorder
from speculative_vlm.bags.typestore import UnknownMessageType, installed_typestore

__all__ = ["BagPlayer", "BagRecorder", "PlaybackReport", "UnknownMessageType", "installed_typestore"]
