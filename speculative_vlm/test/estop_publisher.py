"""Helper process for the e-stop tests: a publisher of ``motion/estop`` with the QoS it is told.

    python estop_publisher.py <namespace> <default|transient_local|best_effort>

``default`` is rclpy's default publisher QoS (reliable, volatile, depth 10), what teleop nodes
and most user code use. The process prints ``matched`` once DDS has matched the publisher with a
subscription (or ``unmatched`` after 15 s), publishes ``True`` ONCE when a line arrives on stdin
and prints ``published <time.monotonic()>`` (CLOCK_MONOTONIC, comparable across processes), then
keeps the publisher alive until stdin closes, so that reliable delivery can finish.
"""

import sys
import threading
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Bool

try:
    from rclpy.event_handler import PublisherEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import PublisherEventCallbacks

PROFILES = {
    "default": QoSProfile(depth=10),
    "transient_local": QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
    ),
    "best_effort": QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT),
}


def main() -> int:
    namespace, kind = sys.argv[1], sys.argv[2]
    rclpy.init()
    node = Node("estop_publisher", namespace=namespace)
    matched = threading.Event()

    def on_matched(info) -> None:
        if info.current_count > 0:
            matched.set()

    pub = node.create_publisher(
        Bool, "motion/estop", PROFILES[kind], event_callbacks=PublisherEventCallbacks(matched=on_matched)
    )
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin)
    spinner.start()
    print("matched" if matched.wait(15.0) else "unmatched", flush=True)
    try:
        if sys.stdin.readline():
            t = time.monotonic()
            pub.publish(Bool(data=True))
            print(f"published {t:.6f}", flush=True)
            sys.stdin.read()  # until the test closes stdin
    finally:
        executor.shutdown(timeout_sec=1.0)
        spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
