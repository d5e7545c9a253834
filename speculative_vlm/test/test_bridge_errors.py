"""Errors keep their type over the ROS hop: the drafter raises what the verifier raised.

A real chain over real DDS and gRPC: a verifier server on loopback (tiny random models), the
bridge node with its gRPC client, and a node holding the drafter's ROS adapter (RosVerifier),
all in this process. A refusal crosses each hop as its code and reason and is raised again
through the one table of ``protocol.errors``.
"""

from __future__ import annotations

import uuid

import pytest
from go2_harness import Spinner
from polling import wait_for
from rclpy.node import Node
from speculative_vlm.cloud.config import ServerConfig, ServerLimits
from speculative_vlm.cloud.server import serve
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.retry import retryable
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    GenerationSettings,
    PromptTooLong,
    SessionNotFound,
    SessionRequest,
)
from speculative_vlm.protocol import errors
from speculative_vlm.protocol.client import GrpcVerifier
from tiny_models import tiny_pair

from speculative_vlm_msgs.srv import CloseSession

TOKEN = "bridge-errors-token-0123456789abcdef"
PROMPT_LIMIT = 64  # the server's limit in target tokens
TOO_LONG = SessionRequest(prompt="go left " * 40, settings=GenerationSettings(max_new_tokens=8))  # ~80 tokens
pytestmark = pytest.mark.ros


class Chain:
    """Server <- gRPC <- bridge node <- DDS <- a node with the drafter's RosVerifier."""

    def __init__(self) -> None:
        from speculative_vlm.nodes.bridge import BridgeNode
        from speculative_vlm.nodes.ros_verifier import RosVerifier

        self.target, self.draft = tiny_pair()
        mp = pytest.MonkeyPatch()
        mp.setenv("SPECULATIVE_VLM_TOKENS", f"robot:{TOKEN}")
        self.server = serve(ServerConfig(bind="127.0.0.1:0", limits=ServerLimits(max_prompt_tokens=PROMPT_LIMIT)),
                            engine=TargetEngine(self.target))
        mp.undo()
        ns = "/e" + uuid.uuid4().hex[:8]
        self.bridge = BridgeNode(verifier=GrpcVerifier(f"127.0.0.1:{self.server.port}", token=TOKEN), namespace=ns)
        self.robot = Node("robot", namespace=ns)
        self.verifier = RosVerifier(self.robot, service_timeout_s=30.0)
        self.spinner = Spinner()
        for node in (self.bridge, self.robot):
            self.spinner.add(node)

    def close(self) -> None:
        self.spinner.shutdown()
        for node in (self.robot, self.bridge):
            node.destroy_node()
        self.server.stop()


@pytest.fixture(scope="module")
def chain(ros):
    c = Chain()
    yield c
    c.close()


@pytest.mark.parametrize("code", sorted(errors.ERRORS))
def test_every_code_of_the_table_crosses_the_ros_hop_as_its_own_type_code_and_reason(code):
    from builtin_interfaces.msg import Time
    from speculative_vlm.nodes.spec_messages import error_msg, msg_to_error, open_error, refuse_open

    from speculative_vlm_msgs.srv import OpenSession

    sent = errors.exception_for(code, "why it was refused")
    for received in (msg_to_error(error_msg("s1", sent, stamp=Time())),
                     open_error(refuse_open(OpenSession.Response(), sent))):
        assert type(received) is type(sent) is errors.ERRORS[code].exception
        assert (received.code, received.reason) == (code, "why it was refused")


@pytest.mark.parametrize("method", ["speculative", "cloud_ar"])
def test_a_prompt_too_long_for_the_verifier_reaches_the_loop_over_ros_as_prompt_too_long(chain, method):
    decoder = SpeculativeDecoder(chain.draft, chain.verifier, method=method)
    with pytest.raises(PromptTooLong) as raised:
        decoder.generate(TOO_LONG)
    # The code and the reason arrive once each, not folded into one "code: reason" string.
    assert raised.value.code == "prompt_too_long"
    assert f"limit is {PROMPT_LIMIT}" in raised.value.reason and not raised.value.reason.startswith("prompt_too_long")
    assert not retryable(raised.value)


def test_a_block_for_a_session_the_bridge_has_closed_raises_session_not_found_in_the_drafter(chain):
    session = chain.verifier.open(SessionRequest(prompt="sit down", settings=GenerationSettings(max_new_tokens=8)))
    close = chain.robot.create_client(CloseSession, "spec/close")
    try:  # the bridge forgets the session behind the adapter's back
        future = close.call_async(CloseSession.Request(session_id=session.session_id))
        assert wait_for(future.done, 10.0) and future.result().success
    finally:
        chain.robot.destroy_client(close)
    session.submit(DraftBlock(round=0, base_length=0, base_tail=(), tokens=(1, 2)))
    with pytest.raises(SessionNotFound) as raised:
        session.next_verdict(timeout=10.0)
    assert raised.value.code == "no_session" and session.session_id in raised.value.reason
    assert retryable(raised.value)  # the drafter decodes the step again in a new session
    session.close()
