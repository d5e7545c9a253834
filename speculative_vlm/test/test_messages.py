"""Every custom interface crosses a real DDS graph between two processes unchanged."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rclpy
from rclpy.node import Node

from speculative_vlm_msgs.action import Instruct
from speculative_vlm_msgs.msg import DecodingStats, DraftBlock, LocomotionCommand, Verdict
from speculative_vlm_msgs.srv import CloseSession, OpenSession

SAMPLES = {
    "LocomotionCommand": LocomotionCommand(
        action=LocomotionCommand.MOVE, vx=0.5, vy=-0.125, vyaw=0.25, duration=2.0, verified=True,
        text='{"action": "move", "vx": 0.5, "vy": -0.125, "vyaw": 0.25, "duration": 2.0}',
    ),
    "DraftBlock": DraftBlock(
        session_id="s1", round=3, base_length=12, base_tail=[5, 6], tokens=[7, 8, 9, 10],
        preemptive=True, q_offsets=[0, 2, 3], q_ids=[7, 11, 8], q_probs=[0.75, 0.25, 1.0],
    ),
    "Verdict": Verdict(
        session_id="s1", round=3, kind=Verdict.EARLY, accepted=2, token=42, confidence=0.875, exit_layer=8,
    ),
    "DecodingStats": DecodingStats(
        session_id="s1", rounds=4, drafted=16, accepted=12, generated=17, target_passes=4,
        acceptance_rate=0.75, tokens_per_pass=4.25, tokens_per_second=20.5,
    ),
    "InstructFeedback": Instruct.Feedback(step=2, text="{", command=LocomotionCommand(action=LocomotionCommand.STOP)),
}


@pytest.fixture(scope="module")
def echo_process():
    script = Path(__file__).with_name("ros_echo.py")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def node(rclpy_context):
    n = Node("test_messages")
    yield n
    n.destroy_node()


@pytest.mark.ros
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_message_round_trips_between_processes(echo_process, node, name):
    sent = SAMPLES[name]
    received = []
    sub = node.create_subscription(type(sent), f"out/{name}", received.append, 10)
    pub = node.create_publisher(type(sent), f"in/{name}", 10)
    deadline = time.monotonic() + 20
    # Publish until the echo has matched and answered (discovery takes a moment).
    while not received and time.monotonic() < deadline:
        pub.publish(sent)
        rclpy.spin_once(node, timeout_sec=0.2)
    node.destroy_subscription(sub)
    node.destroy_publisher(pub)
    assert received, f"no {name} came back within 20 s"
    assert received[0] == sent


def test_services_have_the_fields_a_session_needs():
    req = OpenSession.Request(instruction="walk to the red ball", prompt="p", grammar="command", max_new_tokens=64)
    assert req.grammar == "command"
    assert {"success", "reason", "session_id"} <= set(OpenSession.Response.get_fields_and_field_types())
    assert {"success", "reason"} <= set(CloseSession.Response.get_fields_and_field_types())
    assert Verdict.FINAL != Verdict.EARLY
