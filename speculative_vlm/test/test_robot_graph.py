"""The robot graph end to end over real DDS: camera, motion, bridge, drafter against the simulated
Go2 (a subprocess speaking the SDK protocol) and a real gRPC verifier on loopback, reached through
the netem delay proxy so a test can slow the link down.

Tiny random models keep it fast: their commands are arbitrary but grammar-valid, which is what
these tests need (plumbing, safety, losslessness). Quality with the real models is the main job's
and the benchmark's business.
"""

from __future__ import annotations

import threading
import time

import pytest
from action_msgs.msg import GoalStatus
from polling import result_of, wait_for, wait_until
from rclpy.parameter import Parameter
from robot_graph_harness import MAX_DURATION, MAX_VX, MAX_VY, MAX_VYAW, MIN_VX, Graph, Outcome
from speculative_vlm.benchmark.netem import LinkProfile
from speculative_vlm.commands.schema import parse_command
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.protocol.client import GrpcVerifier

from speculative_vlm_msgs.action import Instruct
from speculative_vlm_msgs.msg import LocomotionCommand

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def graph(rclpy_context, tmp_path_factory):
    g = Graph(tmp_path_factory.mktemp("graph"))
    yield g
    g.close()


def test_instruct_goal_runs_verified_commands_within_limits_with_feedback_per_step(graph):
    feedback = []
    graph.active.clear()
    response = graph.instruct("walk to the red ball", max_steps=2, feedback=feedback)
    result = response.result
    assert result.outcome in (Outcome.SUCCEEDED, Outcome.STEP_LIMIT), result.reason
    steps_with_command = {f.feedback.step for f in feedback if f.feedback.command.text}
    assert steps_with_command == set(range(1, result.steps + 1)) or result.steps < 2
    assert any(f.feedback.stats.target_passes > 0 for f in feedback)
    assert any(f.feedback.stats.verify_time_s > 0 for f in feedback)  # the verifier's time crosses gRPC and DDS
    assert len(result.commands) == result.steps
    for cmd in result.commands:
        assert cmd.verified
        parse_command(cmd.text)  # the executed text is a schema-valid command
    for echo in graph.active:  # what the motion node actually ran, after clamping
        assert MIN_VX - 1e-6 <= echo.vx <= MAX_VX + 1e-6
        assert abs(echo.vy) <= MAX_VY + 1e-6 and abs(echo.vyaw) <= MAX_VYAW + 1e-6
        assert 0.0 <= echo.duration <= MAX_DURATION + 1e-6


def test_a_goal_that_reaches_the_step_limit_is_aborted_not_succeeded(graph):
    # The tiny target answers the start frame with MOVE commands, never DONE: two steps run out.
    response = graph.instruct("walk to the red ball", max_steps=2)
    result = response.result
    assert result.outcome == Outcome.STEP_LIMIT and not result.success, result.reason
    assert response.status == GoalStatus.STATUS_ABORTED
    assert result.steps == 2 and "step limit of 2" in result.reason


def test_a_refused_prompt_ends_the_goal_refused_not_as_a_lost_link(graph):
    # Longer than the tiny models' 512-token context: refused before any block is drafted.
    response = graph.instruct("walk to the red ball " * 200, max_steps=2)
    result = response.result
    assert result.outcome == Outcome.REFUSED and not result.success, result.reason
    assert response.status == GoalStatus.STATUS_ABORTED
    assert "prompt_too_long" in result.reason and result.steps == 0


def test_commands_through_the_graph_equal_the_target_alone_on_frames_replayed_from_a_bag(graph, tmp_path):
    from speculative_vlm.bags.player import BagPlayer
    from speculative_vlm.bags.recorder import BagRecorder
    from speculative_vlm.commands.prompts import SYSTEM_PROMPT

    # 1. Record the simulated Go2's camera into a bag.
    graph.frame_timer.cancel()
    camera = graph.camera_class(parameter_overrides=graph.camera_params)
    graph.spinner.add(camera)
    bag = tmp_path / "frames"
    recorder = BagRecorder(graph.probe, bag, topics=["camera/image_raw"])
    wait_for(lambda: recorder.counts.get("/camera/image_raw", 0) >= 5, 20, step=0.1)
    recorder.close()
    graph.spinner.remove(camera)
    camera.destroy_node()
    assert recorder.counts.get("/camera/image_raw", 0) >= 5
    # 2. Replay it as the camera while the graph follows an instruction.
    player = BagPlayer(graph.probe, bag, loop=True, clock_hz=0)
    player.start()
    graph.prompts.clear()
    feedback = []
    try:
        response = graph.instruct("turn to face the blue box", max_steps=2, feedback=feedback)
    finally:
        player.stop()
        graph.frame_timer.reset()
    texts = [f.feedback.command.text for f in feedback if f.feedback.command.text]
    assert texts, response.result.reason
    assert len(graph.prompts) == len(texts)
    # 3. The target alone (cloud autoregressive on the same server) on the same prompts.
    alone = GrpcVerifier(f"127.0.0.1:{graph.port}")
    try:
        for prompt, text in zip(graph.prompts, texts, strict=True):
            request = SessionRequest(prompt=prompt, system=SYSTEM_PROMPT,
                                     settings=GenerationSettings(max_new_tokens=64, grammar="command"))
            assert graph.target.decode(alone.generate(request)) == text
    finally:
        alone.close()


def test_cancel_stops_the_robot(graph):
    graph.active.clear()
    goal = Instruct.Goal(instruction="walk to the red ball", max_steps=20)
    handle = result_of(graph.client.send_goal_async(goal), 30)
    result = handle.get_result_async()
    _wait_until_moving(graph, result)
    time.sleep(0.2)
    assert graph.speed() > 0.05  # moving when the cancel comes
    result_of(handle.cancel_goal_async(), 10)
    response = result_of(result, 30)
    assert response.result.outcome == Outcome.CANCELED and not response.result.success, response.result.reason
    assert response.status == GoalStatus.STATUS_CANCELED
    time.sleep(1.0)  # StopMove went out at once; the sim decelerates within its limits
    assert graph.speed() < 0.05


def _stamp(cmd: LocomotionCommand) -> tuple[int, int]:
    return cmd.header.stamp.sec, cmd.header.stamp.nanosec


def _wait_until_moving(graph, result_future) -> None:
    wait_until(lambda: any(a.action == LocomotionCommand.MOVE and a.duration > 0 for a in graph.active), 60,
               "an executed MOVE", step=0.02, unless=result_future.done)


def test_a_new_goal_preempts_the_running_one_which_stops_the_robot_and_ends_preempted(graph):
    graph.active.clear()
    first = result_of(graph.client.send_goal_async(Instruct.Goal(instruction="walk to the red ball", max_steps=20)), 30)
    first_result = first.get_result_async()
    _wait_until_moving(graph, first_result)
    # What the motion node executed, in order: the drafter's commands come as motion/execute goals,
    # its STOPs on motion/command, and the motion node echoes each on motion/active_command.
    sent = len(graph.active)
    second = result_of(graph.client.send_goal_async(Instruct.Goal(instruction="walk to the red ball", max_steps=1)), 30)
    assert second.accepted  # not rejected because another goal runs
    old = result_of(first_result, 30)
    assert old.result.outcome == Outcome.PREEMPTED and not old.result.success, old.result.reason
    assert old.status == GoalStatus.STATUS_ABORTED and "newer goal" in old.result.reason
    new = result_of(second.get_result_async(), 120)
    assert new.result.outcome in (Outcome.SUCCEEDED, Outcome.STEP_LIMIT), new.result.reason
    assert new.result.steps == 1  # the new goal ran
    after = graph.active[sent:]
    stops = [i for i, c in enumerate(after) if c.action == LocomotionCommand.STOP]
    new_commands = [i for i, c in enumerate(after) if _stamp(c) in {_stamp(n) for n in new.result.commands}]
    assert stops and new_commands and stops[0] < new_commands[0]  # stopped before the new goal commanded
    old_stamps = {_stamp(c) for c in old.result.commands}
    assert not any(_stamp(c) in old_stamps for c in after[stops[0]:])  # nothing of the old goal after it


def test_a_cancel_during_decoding_ends_the_goal_within_one_round(graph):
    graph.link.profile = LinkProfile(delay_s=0.15)  # every round now waits >= 0.3 s for its verdict
    commands_before = len(graph.commands)
    try:
        feedback = []
        handle = result_of(graph.client.send_goal_async(
            Instruct.Goal(instruction="walk to the red ball", max_steps=1), feedback_callback=feedback.append), 30)
        result = handle.get_result_async()

        def rounds_seen() -> int:  # one feedback with the verified text per round, until the command
            return sum(1 for f in list(feedback) if f.feedback.text and not f.feedback.command.text)

        wait_until(lambda: rounds_seen() >= 1, 60, "a verified round", step=0.01, unless=result.done)
        result_of(handle.cancel_goal_async(), 10)
        time.sleep(0.1)  # feedback of a round verified just before the cancel arrived is in
        rounds_at_cancel = rounds_seen()
        response = result_of(result, 30)
    finally:
        graph.link.profile = LinkProfile()
    assert response.result.outcome == Outcome.CANCELED and response.status == GoalStatus.STATUS_CANCELED
    assert response.result.stats.rounds <= rounds_at_cancel + 1  # at most the round in flight finished
    assert response.result.steps == 0 and not any(f.feedback.command.text for f in feedback)  # step unfinished
    assert any(c.action == LocomotionCommand.STOP for c in graph.commands[commands_before:])


def test_lost_link_stops_the_robot_and_ends_the_goal_with_a_reason_then_recovers(graph):
    def kill_soon():
        time.sleep(0.3)
        graph.stop_server()

    drafter = graph.nodes[2]
    # With step retries off the goal ends at once; test_robot_restart retries a step across a restart.
    drafter.set_parameters([Parameter("step_retries", value=0)])
    killer = threading.Thread(target=kill_soon)
    killer.start()
    try:
        response = graph.instruct("walk to the red ball", max_steps=20)
    finally:
        killer.join()
        drafter.set_parameters([Parameter("step_retries", value=5)])
    assert response.result.outcome == Outcome.LINK_LOST and not response.result.success, response.result.reason
    assert response.status == GoalStatus.STATUS_ABORTED
    assert "link" in response.result.reason.lower() or "lost" in response.result.reason.lower(), response.result.reason
    time.sleep(1.0)  # motion node's Move stream stops at once on STOP; the sim decelerates
    assert graph.speed() < 0.05
    graph.start_server()  # same port: the bridge's channel reconnects
    deadline = time.monotonic() + 20
    while True:
        response = graph.instruct("walk to the red ball", max_steps=1)
        if response.result.outcome != Outcome.LINK_LOST or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert response.result.outcome in (Outcome.SUCCEEDED, Outcome.STEP_LIMIT), response.result.reason
