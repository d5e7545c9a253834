"""The one way a node executable runs: init, spin on a multi-threaded executor, shut down cleanly.

A multi-threaded executor so that a node's slow callbacks (an action goal decoding, a blocking
service call) never starve its other callbacks. ``before_destroy`` runs first on shutdown, while
the node and its publishers still exist: the motion node sends StopMove there.
"""

from __future__ import annotations

from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node


def spin_node(make_node: Callable[[], Node], args: list[str] | None = None,
              before_destroy: Callable[[Node], None] | None = None) -> int:
    rclpy.init(args=args)
    node = make_node()
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if before_destroy is not None:
            before_destroy(node)
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
