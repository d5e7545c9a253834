"""The nodes' executor (speculative_vlm.nodes.spin.PoolExecutor) on a real DDS graph.

rclpy's MultiThreadedExecutor (up to 10.0.3) hands a ready callback to its pool again and
again while it waits in the pool's queue, spinning with the GIL held; these tests pin the
behaviour that PoolExecutor exists for, and the rest of an executor's contract.
"""

from __future__ import annotations

import threading
import time

import pytest
from polling import wait_for
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from speculative_vlm.nodes.spin import PoolExecutor
from std_msgs.msg import Int32
from std_srvs.srv import Trigger

pytestmark = [pytest.mark.ros, pytest.mark.usefixtures("rclpy_context")]


def counting(executor_class):
    """``executor_class`` counting what it takes from the wait set to hand to its pool."""

    class Counting(executor_class):
        handed_off = 0

        def wait_for_ready_callbacks(self, *args, **kwargs):
            work = super().wait_for_ready_callbacks(*args, **kwargs)
            self.handed_off += 1
            return work

    return Counting(num_threads=1)


def hand_offs_while_the_pool_is_busy(executor, messages: int = 5) -> int:
    """Messages arrive for one node while another node's callback holds the only worker."""
    blocker, talker, listener = Node("blocker"), Node("talker"), Node("listener")
    received = []
    pub = talker.create_publisher(Int32, "executor_test", 10)
    listener.create_subscription(Int32, "executor_test", lambda m: received.append(m.data), 10)
    busy = threading.Event()

    def block_once() -> None:
        timer.cancel()
        busy.set()
        time.sleep(0.5)

    timer = blocker.create_timer(0.05, block_once)
    for node in (blocker, listener):
        executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    try:
        wait_for(lambda: pub.get_subscription_count() > 0, 10)
        thread.start()
        assert busy.wait(5.0)
        for i in range(messages):
            pub.publish(Int32(data=i))
        wait_for(lambda: len(received) >= messages, 10)
        assert received == list(range(messages))
        return executor.handed_off
    finally:
        executor.shutdown(timeout_sec=2.0)
        for node in (blocker, talker, listener):
            node.destroy_node()


def test_a_queued_callback_is_handed_to_the_pool_once():
    n = hand_offs_while_the_pool_is_busy(counting(PoolExecutor))
    assert n <= 1 + 5 + 2, f"{n} hand-offs for 1 timer callback and 5 messages"


@pytest.mark.filterwarnings("ignore:MultiThreadedExecutor is used with a single thread")
def test_rclpy_multithreaded_executor_still_hands_a_queued_callback_over_repeatedly():
    # Guards the reason PoolExecutor exists: if this starts failing, rclpy has the fix
    # (ros2/rclpy#1547) and the nodes could go back to MultiThreadedExecutor.
    n = hand_offs_while_the_pool_is_busy(counting(MultiThreadedExecutor))
    assert n > 100, f"{n} hand-offs for 1 timer callback and 5 messages"


def test_callbacks_run_in_parallel_across_nodes_and_exceptions_reach_the_spinner():
    executor = PoolExecutor(num_threads=2)
    a, b = Node("slow_server"), Node("caller")
    release = threading.Event()

    def slow(_req, resp):
        release.wait(5.0)  # blocks one worker; the other must still serve the second node
        resp.success = True
        return resp

    a.create_service(Trigger, "slow", slow)
    ticks = []
    b.create_timer(0.02, lambda: ticks.append(time.monotonic()))
    client = b.create_client(Trigger, "slow")
    for n in (a, b):
        executor.add_node(n)
    try:
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(Trigger.Request())
        t0 = time.monotonic()
        executor.spin_until_future_complete(future, timeout_sec=0.5)  # the server is blocked: times out
        assert not future.done()
        assert len([t for t in ticks if t >= t0]) >= 5, "the timer starved while another callback blocked"
        release.set()
        executor.spin_until_future_complete(future, timeout_sec=5.0)
        assert future.done() and future.result().success

        def boom():
            raise RuntimeError("callback failed")

        b.create_timer(0.01, boom)
        with pytest.raises(RuntimeError, match="callback failed"):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.1)
    finally:
        release.set()
        executor.shutdown(timeout_sec=2.0)
        a.destroy_node()
        b.destroy_node()
