"""The motion node's ``motion/execute`` action over real DDS, driving the simulated Go2.

A command sent as a goal runs until it ends; the result says how (and why), feedback says how far
it is. The sport requests are watched on the wire (rt/api/sport/request), as in test_motion_node.
"""

from __future__ import annotations

import time

import pytest
from action_msgs.msg import GoalStatus
from go2_harness import STOP_MOVE
from polling import wait_for
from rclpy.action import ActionClient
from std_msgs.msg import Bool

from speculative_vlm_msgs.action import ExecuteCommand
from speculative_vlm_msgs.msg import LocomotionCommand

pytestmark = pytest.mark.ros
Result = ExecuteCommand.Result


@pytest.fixture
def rig(motion_rig):
    """The motion rig with an action client for ``motion/execute`` on its probe node."""
    motion_rig.client = ActionClient(motion_rig.probe, ExecuteCommand, "motion/execute")
    assert motion_rig.client.wait_for_server(timeout_sec=15.0)
    yield motion_rig
    motion_rig.client.destroy()


def _done(future, timeout: float = 10.0):
    assert wait_for(future.done, timeout), "the action did not answer"
    return future.result()


def send(rig, vx: float = 0.0, duration: float = 0.0, action: int = LocomotionCommand.MOVE,
         verified: bool = True, feedback: list | None = None):
    command = LocomotionCommand(action=action, vx=vx, duration=duration, verified=verified, text="test")
    command.header.stamp = rig.probe.get_clock().now().to_msg()
    handle = _done(rig.client.send_goal_async(ExecuteCommand.Goal(command=command),
                                              feedback_callback=feedback.append if feedback is not None else None))
    assert handle.accepted
    return handle, handle.get_result_async()


def test_a_goal_runs_its_clamped_duration_with_feedback_and_ends_completed(rig):
    feedback = []
    t0 = time.monotonic()
    _, result = send(rig, vx=0.9, duration=1.0, feedback=feedback)
    response = _done(result)
    assert response.status == GoalStatus.STATUS_SUCCEEDED
    assert response.result.outcome == Result.COMPLETED and "moved for 1 s" in response.result.reason
    assert response.result.executed.vx == pytest.approx(0.6) and response.result.executed.text == "test"
    assert response.result.elapsed_s == pytest.approx(1.0, abs=0.1)
    assert rig.sport.since(t0, STOP_MOVE), "no StopMove at the end"
    assert rig.sport.moves_since(t0)[0][1]["x"] == pytest.approx(0.6)
    remaining = [f.feedback.remaining_s for f in feedback]
    assert len(feedback) >= 5 and remaining == sorted(remaining, reverse=True)
    # The velocity streamed while time remains (at the end it is 0: StopMove is on its way).
    moving = [f for f in feedback if f.feedback.remaining_s > 0]
    assert moving, "no feedback while time remained"
    assert all(f.feedback.vx == pytest.approx(0.6) for f in moving)


def test_cancelling_a_goal_stops_the_robot_at_once_and_ends_it_canceled(rig):
    handle, result = send(rig, vx=0.5, duration=4.0)
    assert wait_for(lambda: rig.state.speed() > 0.3, 5.0)
    t_cancel = time.monotonic()
    _done(handle.cancel_goal_async())
    assert wait_for(lambda: rig.sport.since(t_cancel, STOP_MOVE), 1.0), "no StopMove after the cancel"
    assert rig.sport.since(t_cancel, STOP_MOVE)[0][0] - t_cancel < 0.2
    response = _done(result)
    assert response.status == GoalStatus.STATUS_CANCELED and response.result.outcome == Result.CANCELED
    rig.wait_still()


def test_a_newer_goal_or_a_topic_command_preempts_the_running_goal(rig):
    _, first = send(rig, vx=0.3, duration=4.0)
    _, second = send(rig, vx=0.4, duration=4.0)
    response = _done(first)
    assert response.status == GoalStatus.STATUS_ABORTED and response.result.outcome == Result.PREEMPTED
    assert "motion/execute goal" in response.result.reason
    rig.command.publish(LocomotionCommand(action=LocomotionCommand.STOP, verified=True))
    response = _done(second)
    assert response.result.outcome == Result.PREEMPTED and "motion/command" in response.result.reason
    rig.wait_still()


def test_an_estop_ends_the_running_goal_estopped_and_refuses_the_next_with_the_reason(rig):
    _, result = send(rig, vx=0.5, duration=4.0)
    assert wait_for(lambda: rig.state.speed() > 0.3, 5.0)
    rig.estop.publish(Bool(data=True))
    response = _done(result)
    assert response.status == GoalStatus.STATUS_ABORTED and response.result.outcome == Result.ESTOPPED
    _, refused = send(rig, vx=0.5, duration=1.0)
    response = _done(refused)
    assert response.result.outcome == Result.REJECTED and "release_estop" in response.result.reason
    assert rig.call(rig.release).success
    rig.wait_still()


def test_an_unverified_goal_is_rejected_with_the_reason(rig):
    t0 = time.monotonic()
    _, result = send(rig, vx=0.5, duration=1.0, verified=False)
    response = _done(result)
    assert response.status == GoalStatus.STATUS_ABORTED and response.result.outcome == Result.REJECTED
    assert "require_verified" in response.result.reason
    assert not rig.sport.moves_since(t0)


def test_a_posture_goal_completes_once_its_requests_are_sent(rig):
    _, result = send(rig, action=LocomotionCommand.STOP)
    response = _done(result)
    assert response.result.outcome == Result.COMPLETED and response.result.reason == "StopMove sent"
