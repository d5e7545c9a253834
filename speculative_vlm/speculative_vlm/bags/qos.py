"""QoS for recording and replay, following what `ros2 bag` does.

The recorder adapts to the publishers it finds (best effort if any publisher is best
effort, transient local only if all are) and stores their offered profiles in the bag;
the player re-offers durability from those profiles and publishes reliably, which every
subscriber, reliable or best effort, can match.
"""

from __future__ import annotations

from collections.abc import Sequence

from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)

# Subscriptions buffer this many messages per topic while the writer is busy.
RECORD_DEPTH = 100
REPLAY_DEPTH = 10


def _time(duration: Duration) -> QosTime:
    sec, nsec = divmod(int(duration.nanoseconds), 1_000_000_000)
    return QosTime(sec=sec, nsec=nsec)


def to_bag_qos(profile: QoSProfile) -> Qos:
    """An rclpy profile as rosbags stores it in metadata.yaml (enum values are rmw's)."""
    return Qos(
        history=QosHistory(int(profile.history)),
        depth=int(profile.depth),
        reliability=QosReliability(int(profile.reliability)),
        durability=QosDurability(int(profile.durability)),
        deadline=_time(profile.deadline),
        lifespan=_time(profile.lifespan),
        liveliness=QosLiveliness(int(profile.liveliness)),
        liveliness_lease_duration=_time(profile.liveliness_lease_duration),
        avoid_ros_namespace_conventions=bool(profile.avoid_ros_namespace_conventions),
    )


def recording_qos(offered: Sequence[QoSProfile]) -> QoSProfile:
    """A subscription profile that matches every one of the offered publisher profiles."""
    best_effort = any(int(p.reliability) == int(ReliabilityPolicy.BEST_EFFORT) for p in offered)
    latched = bool(offered) and all(int(p.durability) == int(DurabilityPolicy.TRANSIENT_LOCAL) for p in offered)
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=RECORD_DEPTH,
        reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )


def replay_qos(recorded: Sequence[Qos]) -> QoSProfile:
    """The publisher profile for replaying a topic recorded with `recorded` offered profiles."""
    latched = bool(recorded) and all(q.durability == QosDurability.TRANSIENT_LOCAL for q in recorded)
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=REPLAY_DEPTH,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )
