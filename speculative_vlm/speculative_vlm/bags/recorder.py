"""Record topics of a live ROS 2 graph into a rosbag2 MCAP bag (what `ros2 bag record` does).

Topics are subscribed raw (CDR bytes, no deserialisation) once a publisher is seen, with
a QoS adapted to the publishers, and stamped with the node clock at receipt, so a recorder
on a node with use_sim_time records sim time like `ros2 bag record --use-sim-time`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from rclpy.node import Node
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from speculative_vlm.bags.message_types import rclpy_class
from speculative_vlm.bags.qos import recording_qos, to_bag_qos
from speculative_vlm.bags.typestore import UnknownMessageType, add_types

# Recording "everything" skips these, as they are noise for replay (ros2 bag records them).
DEFAULT_EXCLUDE = ("/rosout", "/parameter_events")
BAG_VERSION = 9  # rosbag2 metadata version written by Jazzy and Kilted


class BagExists(FileExistsError):
    """The output path is taken; rosbag2 never overwrites a bag."""


class BagRecorder:
    """Records `topics` (all visible topics when None) that `node` sees into a new bag at `path`.

    The node must be spun by its executor; subscriptions appear as publishers are
    discovered. Call :meth:`close` (or use it as a context manager) to write metadata.yaml.
    """

    def __init__(
        self,
        node: Node,
        path: str | Path,
        topics: Sequence[str] | None = None,
        *,
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
        include_hidden: bool = False,
        discovery_period_s: float = 0.2,
    ) -> None:
        self._node = node
        self.path = Path(path)
        if self.path.exists():
            raise BagExists(f"{self.path} exists; rosbag2 never overwrites a bag, choose another output path")
        self._wanted = None if topics is None else {node.resolve_topic_name(t) for t in topics}
        self._exclude = set(exclude)
        self._include_hidden = include_hidden
        self._typestore = get_typestore(Stores.EMPTY)
        self._lock = threading.Lock()
        self._writer: Writer | None = Writer(self.path, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._subscriptions = {}
        self._connections = {}
        self._counts: dict[str, int] = {}
        self._refused: dict[str, str] = {}
        self._timer = node.create_timer(discovery_period_s, self._discover)
        self._discover()

    @property
    def counts(self) -> dict[str, int]:
        """Messages written so far, per topic."""
        with self._lock:
            return dict(self._counts)

    @property
    def recording(self) -> list[str]:
        """Topics subscribed so far."""
        return sorted(self._subscriptions)

    @property
    def refused(self) -> dict[str, str]:
        """Topics that cannot be recorded, with the reason (an unknown type, mostly)."""
        return dict(self._refused)

    def _selected(self, topic: str) -> bool:
        if self._wanted is not None:
            return topic in self._wanted
        hidden = any(part.startswith("_") for part in topic.split("/"))
        return topic not in self._exclude and (self._include_hidden or not hidden)

    def _discover(self) -> None:
        if self._writer is None:
            return
        for topic, types in self._node.get_topic_names_and_types():
            if topic in self._subscriptions or topic in self._refused or not self._selected(topic):
                continue
            publishers = self._node.get_publishers_info_by_topic(topic)
            if not publishers:
                continue  # wait for a publisher so the QoS can adapt to it
            if len(types) > 1:
                self._node.get_logger().warning(f"{topic} carries several types {types}; recording {types[0]}")
            try:
                self._subscribe(topic, types[0], [p.qos_profile for p in publishers])
            except UnknownMessageType as exc:
                self._refused[topic] = str(exc)
                self._node.get_logger().error(f"not recording {topic}: {exc}")

    def _subscribe(self, topic: str, msgtype: str, offered: list) -> None:
        msg_class = rclpy_class(msgtype)
        add_types(self._typestore, [msgtype])
        with self._lock:
            connection = self._writer.add_connection(
                topic, msgtype, typestore=self._typestore, offered_qos_profiles=[to_bag_qos(q) for q in offered]
            )
            self._counts[topic] = 0
        self._subscriptions[topic] = self._node.create_subscription(
            msg_class, topic, partial(self._write, topic, connection), recording_qos(offered), raw=True
        )
        self._node.get_logger().info(f"recording {topic} ({msgtype})")

    def _write(self, topic: str, connection, data: bytes) -> None:
        stamp = self._node.get_clock().now().nanoseconds
        with self._lock:
            if self._writer is None:
                return
            self._writer.write(connection, stamp, data)
            self._counts[topic] += 1

    def close(self) -> None:
        """Stop recording and finish the bag (index and metadata.yaml). Safe to call twice."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is None:
            return
        self._node.destroy_timer(self._timer)
        for subscription in self._subscriptions.values():
            self._node.destroy_subscription(subscription)
        writer.close()

    def __enter__(self) -> BagRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
