"""How the drafter has its commands executed: each one is a goal of the motion node's
``motion/execute`` action, and the goal's result (not mirrored topics) tells the drafter how it ended.

Drafter and bridge are real nodes over DDS with tiny models (test_drafter_exchange's Exchange); the
motion side is a probe action server with the motion node's interface whose answer each test sets,
so each way a command can end is seen exactly. test_robot_graph runs the real motion node.
"""

from __future__ import annotations

import threading
import time

import pytest
from action_msgs.msg import GoalStatus
from drafter_harness import Exchange
from polling import wait_for
from rclpy.action import ActionServer, CancelResponse
from rclpy.callback_groups import ReentrantCallbackGroup

from speculative_vlm_msgs.action import ExecuteCommand, Instruct
from speculative_vlm_msgs.msg import LocomotionCommand

pytestmark = pytest.mark.ros
Motion = ExecuteCommand.Result


class MotionProbe:
    """``motion/execute`` on the probe node: records goals and answers as ``answer`` says. As the motion
    node does, it holds no executor thread while a goal runs (the test's pool has few threads)."""

    def __init__(self, node) -> None:
        self.goals: list[LocomotionCommand] = []
        self.cancelled = threading.Event()
        self.answer: tuple[int, str] | None = (Motion.COMPLETED, "moved")  # None: run until cancelled
        self.stops: list[LocomotionCommand] = []
        node.create_subscription(LocomotionCommand, "motion/command",
                                 lambda m: self.stops.append(m) if m.action == LocomotionCommand.STOP else None, 10)
        self.server = ActionServer(node, ExecuteCommand, "motion/execute", execute_callback=self._end,
                                   handle_accepted_callback=self._accepted,
                                   cancel_callback=lambda _g: CancelResponse.ACCEPT,
                                   callback_group=ReentrantCallbackGroup())

    def _accepted(self, handle) -> None:
        self.goals.append(handle.request.command)
        answer = self.answer

        def follow() -> None:
            if answer is None:
                wait_for(lambda: handle.is_cancel_requested, 60.0)
            handle.execute()

        threading.Thread(target=follow, daemon=True).start()

    def _end(self, handle) -> ExecuteCommand.Result:
        result = ExecuteCommand.Result(executed=handle.request.command)
        if handle.is_cancel_requested:
            self.cancelled.set()
            handle.canceled()
            result.outcome, result.reason = Motion.CANCELED, "cancelled by the client; StopMove sent"
            return result
        result.outcome, result.reason = self.answer
        if result.outcome == Motion.COMPLETED:
            handle.succeed()
        else:
            handle.abort()
        return result


@pytest.fixture(scope="module")
def rig(rclpy_context, tmp_path_factory):
    exchange = Exchange(tmp_path_factory.mktemp("drafter_motion"))
    motion = MotionProbe(exchange.probe)
    assert wait_for(lambda: exchange.drafter._motion.server_is_ready(), 15.0)
    yield exchange, motion
    motion.server.destroy()
    exchange.close()


def instruct(exchange: Exchange):
    send = exchange.client.send_goal_async(Instruct.Goal(instruction="walk to the red ball", max_steps=1))
    assert wait_for(send.done, 30.0) and send.result().accepted
    return send.result(), send.result().get_result_async()


def test_each_command_is_a_motion_goal_and_the_step_ends_when_its_result_comes(rig):
    exchange, motion = rig
    motion.answer = (Motion.COMPLETED, "moved for 1 s, then StopMove")
    n = len(motion.goals)
    _, result = instruct(exchange)
    assert wait_for(result.done, 120.0)
    response = result.result()
    assert response.result.outcome == Instruct.Result.STEP_LIMIT, response.result.reason
    [goal] = motion.goals[n:]
    [command] = response.result.commands
    assert (goal.header.stamp, goal.text, goal.verified) == (command.header.stamp, command.text, True)


def test_a_command_the_motion_node_ends_otherwise_ends_the_goal_at_once_with_its_reason(rig):
    exchange, motion = rig
    motion.answer = (Motion.ESTOPPED, "e-stop engaged by motion/estop topic; StopMove sent")
    n = len(motion.goals)
    _, result = instruct(exchange)
    assert wait_for(lambda: len(motion.goals) > n, 120.0), "no motion goal"
    t_goal = time.monotonic()
    assert wait_for(result.done, 10.0)
    response = result.result()
    assert response.status == GoalStatus.STATUS_ABORTED and response.result.outcome == Instruct.Result.FAILED
    assert "e-stopped: e-stop engaged by motion/estop topic" in response.result.reason
    # At once: not after the command's duration + motion_timeout_s, as a lost motion node would be.
    assert time.monotonic() - t_goal < 2.0


def test_cancelling_the_goal_cancels_the_running_motion_goal_and_stops_the_robot(rig):
    exchange, motion = rig
    motion.answer = None
    motion.cancelled.clear()
    stops = len(motion.stops)
    n = len(motion.goals)
    handle, result = instruct(exchange)
    assert wait_for(lambda: len(motion.goals) > n, 120.0), "no motion goal"
    cancel = handle.cancel_goal_async()
    assert wait_for(cancel.done, 10.0)
    assert motion.cancelled.wait(5.0), "the motion goal was not cancelled"
    assert wait_for(result.done, 10.0)
    assert result.result().result.outcome == Instruct.Result.CANCELED
    assert wait_for(lambda: len(motion.stops) > stops, 5.0), "no STOP on motion/command"
