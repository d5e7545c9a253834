"""The one way a node executable runs: init, spin on :class:`PoolExecutor`, shut down cleanly.

A thread-pool executor so that a node's slow callbacks (an action goal decoding, a blocking
service call) never starve its other callbacks. ``before_destroy`` runs first on shutdown, while
the node and its publishers still exist: the motion node sends StopMove there.

Why not rclpy's ``MultiThreadedExecutor``: up to rclpy 10.0.3 (every wheel on PyPI, Humble to
Kilted) it hands a ready callback to its pool and, while that callback waits in the pool's queue,
yields it again at once instead of waiting (ros2/rclpy#1452, fixed in 10.0.4 by #1547). The spin
thread then loops holding the GIL and every other Python thread of the process stalls: measured
here, the motion node's 25 Hz Move thread went quiet for 0.1-1.5 s at a time (10-16 Moves in 1 s)
with a 50 Hz odometry subscriber in the same process. :class:`PoolExecutor` waits, with the GIL
released, until the pool has started a callback before it looks for the next one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, ShutdownException, TimeoutException
from rclpy.node import Node

try:  # rclpy >= 8 (Jazzy); older versions never raise it
    from rclpy.executors import ConditionReachedException
except ImportError:  # pragma: no cover - Humble
    class ConditionReachedException(Exception):
        pass


class PoolExecutor(Executor):
    """Runs callbacks in a pool of threads, handing each ready callback to the pool exactly once."""

    def __init__(self, num_threads: int | None = None, *, context=None) -> None:
        super().__init__(context=context)
        if num_threads is None:
            num_threads = max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2)
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="ros-callback")
        self._running: list = []  # handler tasks handed to the pool, kept until done

    def _hand_off(self, timeout_sec=None, condition: Callable[[], bool] | None = None) -> None:
        try:
            if condition is None:
                handler, _entity, _node = self.wait_for_ready_callbacks(timeout_sec)
            else:
                handler, _entity, _node = self.wait_for_ready_callbacks(timeout_sec, None, condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException, ConditionReachedException):
            return
        started = threading.Event()

        def run() -> None:
            started.set()
            handler()

        self._pool.submit(run)
        self._running.append(handler)
        # The wait that rclpy's MultiThreadedExecutor lacks: until a worker has begun this callback
        # its task counts as ready, and looking for work now would find the same task again.
        while not started.wait(0.05):
            if self._is_shutdown or not self.context.ok():
                return
        for task in self._running[:]:
            if task.done():
                self._running.remove(task)
                task.result()  # raise the callback's exception here, as rclpy's executors do

    def spin_once(self, timeout_sec: float | None = None) -> None:
        self._hand_off(timeout_sec)

    def spin_once_until_future_complete(self, future, timeout_sec=None) -> None:
        future.add_done_callback(lambda _f: self.wake())
        self._spin_once_until_future_complete(future, timeout_sec)

    def _spin_once_until_future_complete(self, future, timeout_sec=None) -> None:
        # rclpy >= 8 routes spin_until_future_complete through this hook.
        self._hand_off(timeout_sec, future.done)

    def shutdown(self, timeout_sec: float | None = None, *, wait_for_threads: bool = True) -> bool:
        done = super().shutdown(timeout_sec)
        self._pool.shutdown(wait=wait_for_threads)
        return done


def spin_node(make_node: Callable[[], Node], args: list[str] | None = None,
              before_destroy: Callable[[Node], None] | None = None) -> int:
    rclpy.init(args=args)
    node = make_node()
    executor = PoolExecutor()
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
