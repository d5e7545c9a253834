"""Cloud autoregressive decoding through the ROS bridge, end to end over real DDS and gRPC.

The drafter opens an AUTOREGRESSIVE session through ``spec/open``; the bridge opens it on the gRPC
verifier and publishes each token the target generates as a TOKEN verdict on ``spec/verdict``. The
graph is test_robot_graph's (simulated Go2, gRPC verifier on loopback behind the netem delay proxy,
tiny random models); the target alone is the same server asked directly over gRPC.
"""

from __future__ import annotations

import time

import pytest
from action_msgs.msg import GoalStatus
from polling import result_of, wait_for, wait_until
from rclpy.parameter import Parameter
from robot_graph_harness import Graph
from speculative_vlm.benchmark.netem import LinkProfile
from speculative_vlm.commands.prompts import SYSTEM_PROMPT
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.nodes.ros_verifier import SPEC_QOS
from speculative_vlm.protocol.client import GrpcVerifier

from speculative_vlm_msgs.action import Instruct
from speculative_vlm_msgs.msg import DraftBlock, Verdict

Outcome = Instruct.Result
pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def graph(rclpy_context, tmp_path_factory):
    g = Graph(tmp_path_factory.mktemp("streaming"))
    g.verdicts, g.drafts = [], []
    g.probe.create_subscription(Verdict, "spec/verdict", g.verdicts.append, SPEC_QOS)
    g.probe.create_subscription(DraftBlock, "spec/draft", g.drafts.append, SPEC_QOS)
    yield g
    g.close()


def set_method(graph: Graph, method: str) -> None:
    [result] = graph.nodes[2].set_parameters([Parameter("method", value=method)])
    assert result.successful, result.reason


def target_alone(graph: Graph, prompts: list[str]) -> list[str]:
    """The commands the target generates alone (cloud autoregressive, straight to the server) for ``prompts``."""
    alone = GrpcVerifier(f"127.0.0.1:{graph.port}")
    try:
        settings = GenerationSettings(max_new_tokens=64, grammar="command")
        return [graph.target.decode(alone.generate(SessionRequest(prompt=p, system=SYSTEM_PROMPT, settings=settings)))
                for p in prompts]
    finally:
        alone.close()


def step_feedback(feedback: list) -> list:
    """Each step's last feedback: the one with its command and the step's statistics."""
    return [f.feedback for f in feedback if f.feedback.command.text]


def test_auto_over_a_slow_link_streams_after_the_first_step_and_runs_the_target_s_commands(graph):
    set_method(graph, "auto")
    graph.link.profile = LinkProfile(delay_s=0.25)  # 500 ms round trip: a speculative round costs more than streaming
    graph.prompts.clear()
    feedback: list = []
    try:
        response = graph.instruct("walk to the red ball", max_steps=3, feedback=feedback)
    finally:
        graph.link.profile = LinkProfile()
        set_method(graph, "speculative")
    assert response.result.outcome in (Outcome.SUCCEEDED, Outcome.STEP_LIMIT), response.result.reason
    steps = step_feedback(feedback)
    assert len(steps) == 3 and len(graph.prompts) == 3
    first, *later = [s.stats for s in steps]
    # Nothing measured yet: the first step speculates, and measures the round trip doing so.
    assert first.drafted > 0 and first.rounds > 0
    for stats in later:  # streamed: no block drafted, no round, one target pass per decided token
        assert stats.drafted == 0 and stats.rounds == 0 and stats.target_passes > 0, stats
    streamed = {v.session_id for v in graph.verdicts if v.kind == Verdict.TOKEN}
    assert len(streamed) == 2
    assert [c.text for c in response.result.commands] == target_alone(graph, graph.prompts)


def test_a_cloud_ar_goal_through_the_bridge_runs_the_target_s_own_commands_streamed_as_token_verdicts(graph):
    set_method(graph, "cloud_ar")
    graph.prompts.clear()
    verdicts_before, drafts_before = len(graph.verdicts), len(graph.drafts)
    feedback: list = []
    try:
        response = graph.instruct("turn to face the blue box", max_steps=2, feedback=feedback)
    finally:
        set_method(graph, "speculative")
    result = response.result
    assert result.outcome in (Outcome.SUCCEEDED, Outcome.STEP_LIMIT), result.reason
    assert len(result.commands) == 2 and all(c.verified for c in result.commands)
    assert [c.text for c in result.commands] == target_alone(graph, graph.prompts)
    assert len(graph.drafts) == drafts_before  # nothing drafted
    verdicts = graph.verdicts[verdicts_before:]
    assert verdicts and all(v.kind == Verdict.TOKEN for v in verdicts), sorted({v.kind for v in verdicts})
    sessions: dict[str, list[Verdict]] = {}
    for v in verdicts:
        sessions.setdefault(v.session_id, []).append(v)
    assert len(sessions) == 2  # one streamed session per step
    for tokens in sessions.values():
        assert [v.round for v in tokens] == list(range(len(tokens)))  # each token's index, in order
        assert tokens[-1].eos and not any(v.eos for v in tokens[:-1])
    steps = step_feedback(feedback)
    assert len(steps) == 2, f"{len(steps)} steps' feedback"
    assert all(s.stats.drafted == 0 and s.stats.target_passes > 0 for s in steps)


def test_cancelling_a_streamed_step_stops_the_stream_closes_the_session_and_ends_the_goal(graph):
    bridge = graph.nodes[1]
    set_method(graph, "cloud_ar")
    # A narrow downlink: each token's message takes about a tenth of a second, so the cancel lands mid-stream.
    graph.link.profile = LinkProfile(downlink_bps=1200)
    verdicts_before = len(graph.verdicts)

    def tokens() -> list[Verdict]:
        return [v for v in graph.verdicts[verdicts_before:] if v.kind == Verdict.TOKEN]

    try:
        handle = result_of(graph.client.send_goal_async(Instruct.Goal(instruction="walk to the red ball", max_steps=1)), 30)
        result = handle.get_result_async()
        wait_until(tokens, 60, "a streamed token", step=0.01, unless=result.done)
        [sid] = {v.session_id for v in tokens()}
        assert sid in bridge._sessions and graph.server.service.store.get(sid) is not None
        cancelled_at = time.monotonic()
        result_of(handle.cancel_goal_async(), 10)
        response = result_of(result, 30)
        ended_s = time.monotonic() - cancelled_at
        streamed = len(tokens())
        assert wait_for(lambda: graph.server.service.store.get(sid) is None, 5.0), "the server still streams"
        time.sleep(0.5)
    finally:
        graph.link.profile = LinkProfile()
        set_method(graph, "speculative")
    assert response.result.outcome == Outcome.CANCELED and response.status == GoalStatus.STATUS_CANCELED
    assert response.result.steps == 0 and not response.result.commands
    assert ended_s < 2.0, ended_s
    assert sid not in bridge._sessions  # spec/close reached the bridge, which closed the gRPC stream
    assert len(tokens()) == streamed  # nothing of the session was published after its close
    assert not any(v.eos for v in tokens())  # stopped before the end of the output
