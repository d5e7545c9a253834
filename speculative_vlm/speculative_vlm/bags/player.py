"""Play a rosbag2 bag (MCAP or SQLite, ours or `ros2 bag record`'s) into a live graph.

Messages are published as the CDR bytes stored in the bag, on the wall-clock schedule of
their recorded timestamps divided by the rate. With a clock rate above zero the player
also publishes /clock (the bag time of the playback position), so nodes with
use_sim_time follow the bag: /clock is published just before each message carrying its
timestamp, and at the clock rate in between. Looping starts the bag over, and /clock
jumps back with it, as with `ros2 bag play --loop`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosbags.rosbag2 import Reader
from rosgraph_msgs.msg import Clock

from speculative_vlm.bags.message_types import rclpy_class
from speculative_vlm.bags.qos import replay_qos
from speculative_vlm.bags.typestore import UnknownMessageType, installed_hash

NS_PER_S = 1_000_000_000


class BagNotFound(FileNotFoundError):
    """The bag path holds no rosbag2 bag."""


@dataclass
class PlaybackReport:
    """What a playback did: messages per topic (after remapping), loops completed, wall time."""

    published: dict[str, int] = field(default_factory=dict)
    loops: int = 0
    wall_s: float = 0.0
    stopped: bool = False

    @property
    def total(self) -> int:
        return sum(self.published.values())


def _apply_namespace(topic: str, namespace: str) -> str:
    namespace = namespace.strip("/")
    return f"/{namespace}{topic}" if namespace else topic


class BagPlayer:
    """Publishes the messages of the bag at `path` through `node`.

    rate: playback speed factor (2.0 plays twice as fast). loop: start over at the end until
    stopped. start_offset_s: skip that much of the bag's beginning. topics: bag topics to
    play (all when None). remap: bag topic -> topic to publish on; namespace: prefix for
    every played topic not remapped. clock_hz: /clock publishing rate, 0 for no /clock.
    wait_for_subscribers_s: before starting, wait up to this long for every played topic
    to have a subscriber, so a freshly started graph misses nothing.
    """

    def __init__(
        self,
        node: Node,
        path: str | Path,
        *,
        rate: float = 1.0,
        loop: bool = False,
        start_offset_s: float = 0.0,
        topics: Sequence[str] | None = None,
        remap: Mapping[str, str] | None = None,
        namespace: str = "",
        clock_hz: float = 40.0,
        wait_for_subscribers_s: float = 0.0,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 (got {rate}); use 1.0 for real time")
        if start_offset_s < 0:
            raise ValueError(f"start offset must be >= 0 s (got {start_offset_s})")
        if clock_hz < 0:
            raise ValueError(f"clock rate must be >= 0 Hz (got {clock_hz}); 0 disables /clock")
        self.path = Path(path)
        if not (self.path / "metadata.yaml").is_file() and not self.path.is_file():
            raise BagNotFound(f"no rosbag2 bag at {self.path}: expected a folder with metadata.yaml")
        self._node = node
        self.rate = rate
        self.loop = loop
        self.clock_hz = clock_hz
        self.wait_for_subscribers_s = wait_for_subscribers_s
        remap = dict(remap or {})
        with Reader(self.path) as reader:
            self.start_ns = reader.start_time
            self.end_ns = reader.end_time
            self.message_count = reader.message_count
            connections = list(reader.connections)
        self.duration_s = max(0, self.end_ns - self.start_ns) / NS_PER_S
        self._offset_ns = int(start_offset_s * NS_PER_S)
        bag_topics = {c.topic for c in connections}
        if topics is not None:
            missing = set(topics) - bag_topics
            if missing:
                raise ValueError(f"topics {sorted(missing)} are not in {self.path}; it has {sorted(bag_topics)}")
        self._publishers = {}  # connection id -> (topic played, publisher)
        self.skipped: dict[str, str] = {}
        self.mismatched: dict[str, str] = {}
        by_topic: dict[str, object] = {}
        for connection in connections:
            if topics is not None and connection.topic not in topics:
                continue
            if connection.topic == "/clock" and clock_hz > 0:
                # Two /clock sources would make time jump back and forth.
                self.skipped["/clock"] = "the player publishes /clock itself; use clock_hz=0 to play the bag's"
                continue
            out_topic = remap.get(connection.topic, _apply_namespace(connection.topic, namespace))
            try:
                msg_class = rclpy_class(connection.msgtype)
            except UnknownMessageType as exc:
                self.skipped[connection.topic] = str(exc)
                node.get_logger().error(f"not playing {connection.topic}: {exc}")
                continue
            self._check_definition(connection)
            if out_topic not in by_topic:
                offered = getattr(connection.ext, "offered_qos_profiles", [])
                by_topic[out_topic] = node.create_publisher(msg_class, out_topic, replay_qos(offered))
            self._publishers[connection.id] = (out_topic, by_topic[out_topic])
        if not self._publishers:
            raise ValueError(f"nothing to play in {self.path}: no topic selected has a type rclpy can load {self.skipped}")
        self._connection_ids = set(self._publishers)
        # Reliable matches both rclpy's best-effort /clock subscription and reliable ones;
        # a short history so a busy subscriber still sees the stamp that precedes each message.
        self._clock_pub = (
            node.create_publisher(Clock, "/clock", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
            if clock_hz > 0
            else None
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.report = PlaybackReport(published={t: 0 for t, _ in self._publishers.values()})
        self.position_ns = self.start_ns + self._offset_ns

    def _check_definition(self, connection) -> None:
        """Warn when the bag was recorded with another definition of a type than the installed one.

        The bytes are still played (as `ros2 bag play` does), but subscribers would decode them
        with the installed layout, so the warning says which package version to install.
        """
        recorded = connection.digest or ""
        if not recorded.startswith("RIHS01_"):
            return  # bags before Iron carry no type hash
        installed = installed_hash(connection.msgtype)
        if installed is not None and installed != recorded:
            self.mismatched[connection.topic] = f"bag {recorded}, installed {installed}"
            self._node.get_logger().warning(
                f"{connection.topic}: the bag's {connection.msgtype} differs from the installed definition "
                f"(bag {recorded[:15]}..., installed {installed[:15]}...); subscribers may misread it: install the "
                f"message package version the bag was recorded with"
            )

    @property
    def topics(self) -> list[str]:
        """Topics this player publishes on (after remapping)."""
        return sorted({t for t, _ in self._publishers.values()})

    def start(self) -> None:
        """Play in a background thread; see :meth:`wait` and :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("this player has already been started; create a new one to play again")
        self._thread = threading.Thread(target=self.play, name="bag_player", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop playing as soon as possible (the current wait is interrupted)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a started playback to end; True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _wait_for_subscribers(self) -> None:
        deadline = time.monotonic() + self.wait_for_subscribers_s
        publishers = {t: p for t, p in self._publishers.values()}
        while time.monotonic() < deadline and not self._stop.is_set():
            if all(p.get_subscription_count() > 0 for p in publishers.values()):
                return
            self._stop.wait(0.05)
        lonely = sorted(t for t, p in publishers.items() if p.get_subscription_count() == 0)
        if lonely and self.wait_for_subscribers_s > 0:
            self._node.get_logger().warning(f"no subscriber after {self.wait_for_subscribers_s} s on {lonely}")

    def _publish_clock(self, stamp_ns: int) -> None:
        self.position_ns = stamp_ns
        if self._clock_pub is not None:
            msg = Clock()
            msg.clock.sec, msg.clock.nanosec = divmod(stamp_ns, NS_PER_S)
            self._clock_pub.publish(msg)

    def _sleep_until(self, wall_target: float, wall0: float, bag0_ns: int) -> bool:
        """Sleep until `wall_target` (monotonic), ticking /clock; False if stopped."""
        tick = 1.0 / self.clock_hz if self._clock_pub is not None else None
        while True:
            now = time.monotonic()
            if now >= wall_target:
                return not self._stop.is_set()
            if tick is None:
                if self._stop.wait(wall_target - now):
                    return False
                continue
            if self._stop.wait(min(tick, wall_target - now)):
                return False
            now = time.monotonic()
            if now < wall_target:
                self._publish_clock(bag0_ns + int((now - wall0) * self.rate * NS_PER_S))

    def play(self) -> PlaybackReport:
        """Play the bag in this thread (once, or until stopped when looping); returns the report."""
        began = time.monotonic()
        self._wait_for_subscribers()
        first_ns = self.start_ns + self._offset_ns
        try:
            while not self._stop.is_set():
                wall0 = time.monotonic()
                self._publish_clock(first_ns)
                with Reader(self.path) as reader:
                    wanted = [c for c in reader.connections if c.id in self._connection_ids]
                    for connection, stamp_ns, data in reader.messages(connections=wanted, start=first_ns):
                        target = wall0 + (stamp_ns - first_ns) / NS_PER_S / self.rate
                        if not self._sleep_until(target, wall0, first_ns):
                            break
                        topic, publisher = self._publishers[connection.id]
                        self._publish_clock(stamp_ns)
                        publisher.publish(bytes(data))
                        with self._lock:
                            self.report.published[topic] += 1
                    else:
                        self.report.loops += 1
                if not self.loop:
                    break
        finally:
            self.report.stopped = self._stop.is_set()
            self.report.wall_s = time.monotonic() - began
        return self.report
