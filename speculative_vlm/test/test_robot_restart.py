"""Restarts robots do not notice: the verifier is restarted in the middle of a goal and the goal
ends as an undisturbed one does, with the same commands.

The robot graph of ``test_robot_graph`` (camera frames, motion, bridge, drafter over real DDS, the
simulated Go2 as a subprocess), with the verifier as a real ``speculative-vlm-cloud`` process
(``main()``: flags, signals, drain) on a tiny target whose verification passes take 0.1 s, so a
step decodes for a second or two and SIGTERM lands in the middle of one. The drain answers the
block in flight and ends the session with ``draining``; the drafter stops the robot and decodes
the step again in a new session, which opens once the verifier is back on the same port.
The graph's prompts carry no progress line, so a reference run and a disturbed one ask the same
questions and greedy decoding must give the same answers.
"""

from __future__ import annotations

import signal
import time

import pytest
from cloud_harness import ServerProcess, start_server_script
from polling import result_of, wait_until
from rclpy.parameter import Parameter
from robot_graph_harness import Graph
from speculative_vlm.commands.prompts import SYSTEM_PROMPT
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.protocol.client import GrpcVerifier

from speculative_vlm_msgs.action import Instruct
from speculative_vlm_msgs.msg import LocomotionCommand, Verdict

Outcome = Instruct.Result
pytestmark = pytest.mark.ros

SECONDS_PER_PASS = 0.1
INSTRUCTION, STEPS = "walk to the red ball", 3


class VerifierProcess:
    """The verifier as a process that SIGTERM drains and :meth:`start` brings back on its port."""

    def __init__(self, target_dir) -> None:
        self.target_dir = target_dir
        self.process: ServerProcess | None = None
        self.port = 0

    def start(self) -> float:
        """Start serving (on the port of the last run, if any); returns the seconds it took."""
        began = time.monotonic()
        self.process = start_server_script(
            "slow_pass_cloud_server.py", str(SECONDS_PER_PASS), "--model", str(self.target_dir), "--bind",
            f"127.0.0.1:{self.port}", "--no-auth", "--exit-layers", "2", "--max-wait-ms", "1",
            "--drain-timeout-s", "5")
        self.port = self.process.port
        return time.monotonic() - began

    def terminate(self) -> float:
        """SIGTERM (the drain), then wait for the process to exit; returns the seconds that took."""
        began = time.monotonic()
        self.process.proc.send_signal(signal.SIGTERM)
        assert self.process.proc.wait(30) == 0
        return time.monotonic() - began

    def stop(self, grace: float | None = None) -> None:  # Graph.close's call
        if self.process is not None:
            self.process.stop()


class RestartableGraph(Graph):
    def start_server(self) -> None:
        folder = self.draft_dir.parent / "target"
        self.target.model.save_pretrained(folder)
        self.target.tokenizer.save_pretrained(folder)
        self.server = VerifierProcess(folder)
        self.server.start()
        self.port = self.server.port


@pytest.fixture(scope="module")
def graph(rclpy_context, tmp_path_factory):
    g = RestartableGraph(tmp_path_factory.mktemp("restart"))
    drafter = g.nodes[2]
    drafter.set_parameters([Parameter("retry_backoff_s", value=0.2), Parameter("retry_backoff_max_s", value=2.0),
                            Parameter("verdict_timeout_s", value=5.0)])
    g.verdict_errors: list[str] = []
    g.probe.create_subscription(Verdict, "spec/verdict", lambda m: m.kind == Verdict.ERROR and
                                g.verdict_errors.append(m.code), 100)
    yield g
    g.close()


def _goal(graph, feedback: list):
    send = graph.client.send_goal_async(Instruct.Goal(instruction=INSTRUCTION, max_steps=STEPS),
                                        feedback_callback=feedback.append)
    handle = result_of(send, 60)
    assert handle.accepted
    return handle.get_result_async()


def _texts(result) -> list[str]:
    return [c.text for c in result.commands]


def _decoding(feedback: list, step: int) -> bool:
    """A round of ``step`` has been verified and the step has no command yet."""
    return any(f.feedback.step == step and f.feedback.text and not f.feedback.command.text for f in list(feedback))


def test_a_verifier_restarted_mid_step_costs_the_goal_time_only_with_the_same_commands(graph):
    # An undisturbed run first: the reference.
    began = time.monotonic()
    reference = result_of(_goal(graph, []), 120).result
    undisturbed_s = time.monotonic() - began
    assert reference.outcome in (Outcome.SUCCEEDED, Outcome.STEP_LIMIT), reference.reason
    assert len(reference.commands) >= 2, reference.reason  # the restart lands in step 2
    graph.verdict_errors.clear()
    prompts_before = len(graph.prompts)

    feedback: list = []
    began = time.monotonic()
    result_future = _goal(graph, feedback)
    wait_until(lambda: _decoding(feedback, 2), 60, "step 2 decoding", step=0.005, unless=result_future.done)
    down_s = graph.server.terminate()
    up_s = graph.server.start()  # the same port
    response = result_of(result_future, 120)
    disturbed_s = time.monotonic() - began
    result = response.result

    assert result.outcome == reference.outcome, result.reason
    assert _texts(result) == _texts(reference) and all(c.verified for c in result.commands)
    assert "draining" in graph.verdict_errors  # the drain ended step 2's session mid-step...
    assert len(graph.prompts) - prompts_before == len(result.commands) + (result.outcome == Outcome.SUCCEEDED)
    # ...and the step was decoded again on the same prompt: what the target alone answers to it.
    alone = GrpcVerifier(f"127.0.0.1:{graph.port}")
    try:
        request = SessionRequest(prompt=graph.prompts[-1], system=SYSTEM_PROMPT,
                                 settings=GenerationSettings(max_new_tokens=64, grammar="command"))
        assert graph.target.decode(alone.generate(request)) == _texts(result)[1]
    finally:
        alone.close()
    print(f"\nverifier restarted mid-step 2 of {STEPS}: outcome {result.reason!r}, {len(result.commands)} commands "
          f"equal to the undisturbed run's; the drain and exit took {down_s:.2f} s, the restart {up_s:.2f} s; "
          f"goal {disturbed_s:.2f} s against {undisturbed_s:.2f} s undisturbed "
          f"(+{disturbed_s - undisturbed_s:.2f} s lost to the restart); errors seen: {graph.verdict_errors}")


def test_a_verifier_that_does_not_come_back_ends_the_goal_link_lost_once_the_retries_are_spent(graph):
    drafter, bridge = graph.nodes[2], graph.nodes[1]
    drafter.set_parameters([Parameter("step_retries", value=2), Parameter("retry_backoff_s", value=0.1)])
    bridge.set_parameters([Parameter("open_timeout_s", value=1.0)])
    commands_before = len(graph.commands)
    try:
        feedback: list = []
        result_future = _goal(graph, feedback)
        wait_until(lambda: _decoding(feedback, 1), 60, "step 1 decoding", step=0.005,
                   unless=result_future.done)
        graph.server.terminate()
        began = time.monotonic()
        response = result_of(result_future, 60)
        ended_after = time.monotonic() - began
    finally:
        graph.server.start()
        drafter.set_parameters([Parameter("step_retries", value=5), Parameter("retry_backoff_s", value=0.2)])
        bridge.set_parameters([Parameter("open_timeout_s", value=30.0)])
    result = response.result
    assert result.outcome == Outcome.LINK_LOST and not result.success, result.reason
    assert "2 of 2 retries spent" in result.reason and result.steps == 0
    assert any(c.action == LocomotionCommand.STOP for c in graph.commands[commands_before:])
    assert ended_after < 2 * (1.0 + 0.1 * 2) + 5.0  # two retries, each an open that gives up after 1 s


def test_a_bridge_whose_cloud_address_is_down_opens_on_its_fallback_address(graph):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from speculative_vlm.nodes.bridge import BridgeNode
    from speculative_vlm.nodes.ros_verifier import RosVerifier

    live = f"127.0.0.1:{graph.port}"
    # A second robot's bridge (its own namespace) whose first verifier is gone for good.
    bridge = BridgeNode(namespace="/spare", parameter_overrides=[
        Parameter("cloud_address", value="127.0.0.1:9"), Parameter("fallback_addresses", value=f" {live}, "),
        Parameter("open_timeout_s", value=20.0)])
    probe = Node("spare_probe", namespace="/spare")
    links: list = []  # the operator's view: /diagnostics names the verifier in use
    probe.create_subscription(DiagnosticArray, "/diagnostics", lambda m: links.extend(
        s for s in m.status if s.name == "/spare/bridge: cloud link"), 10)
    for node in (bridge, probe):
        graph.spinner.add(node)
    try:
        session = RosVerifier(probe, service_timeout_s=30.0).open(
            SessionRequest(prompt="turn left", settings=GenerationSettings(max_new_tokens=4)))
        assert session.session_id
        session.close()
        wait_until(lambda: [s for s in list(links) if s.hardware_id == live], 10,
                   f"a cloud link status naming {live}")
    finally:
        for node in (bridge, probe):
            graph.spinner.remove(node)
            node.destroy_node()
