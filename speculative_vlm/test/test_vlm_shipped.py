"""The shipped VLM pair: the VLM target (``smolvlm-robot``, which sees the camera frame) and the text draft
(``command-draft``, which reads the frame as the robot describes it). Greedy speculative output equals the
VLM target alone, token for token: in-process with the trained exits, over gRPC, and through the robot's
graph with the drafter's ``perception: image``."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
from speculative_vlm.commands.prompts import SYSTEM_PROMPT, user_message
from speculative_vlm.commands.scene_text import describe_image
from speculative_vlm.commands.schema import parse_command
from speculative_vlm.decoding import model_store
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.models import load_model
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.go2.render import CameraModel, render_bgr
from speculative_vlm.go2.scene import load_scene

pytestmark = pytest.mark.slow

EXIT_HEADS = Path(__file__).resolve().parents[1] / "models" / "exit-heads" / "smollm2-135m-robot-exits.pt"
SETTINGS = GenerationSettings(max_new_tokens=64, grammar="command")
PROGRESS = "moved 0.0 m forward and 0.0 m to the left, turned 0 degrees; last command: none"


@pytest.fixture(scope="module")
def vlm():
    return load_model(model_store.VLM_TARGET)


@pytest.fixture(scope="module")
def draft():
    return load_model("command-draft")


def robot_request(instruction: str, x: float, y: float, yaw: float) -> SessionRequest:
    """What the drafter node sends for a frame of the sim's scene: the JPEG to the target, scene text to the draft."""
    bgr = render_bgr(load_scene(None), x, y, yaw, CameraModel(width=320, height=240))
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    return SessionRequest(prompt=user_message(instruction, "", PROGRESS), system=SYSTEM_PROMPT, image=jpeg,
                          settings=SETTINGS, draft_prompt=user_message(instruction, describe_image(bgr), PROGRESS))


REQUESTS = [("walk to the red ball", 0.0, 0.0, 0.0), ("turn to face the blue box", 0.5, -0.5, 1.2)]


def alone(vlm, request: SessionRequest) -> list[int]:
    engine = TargetEngine(vlm)
    session = engine.open_session(request)
    try:
        return list(engine.generate(session))
    finally:
        engine.close_session(session)


@pytest.mark.parametrize("spec", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_the_shipped_vlm_pair_with_trained_exits_equals_the_vlm_alone(vlm, draft, spec):
    request = robot_request(*spec)
    expected = alone(vlm, request)
    engine = TargetEngine(vlm, exit_layers=[22], exit_heads=EXIT_HEADS)
    with InProcessVerifier(engine) as verifier:
        result = SpeculativeDecoder(draft, verifier, early_threshold=0.2).generate(request)
    assert result.token_ids == expected
    assert result.stop_reason == "eos"
    parse_command(result.text)
    assert result.acceptance > 0.3  # the draft reads the scene text the VLM sees as pixels


def test_the_shipped_vlm_pair_over_grpc_equals_the_vlm_alone(vlm, draft):
    from speculative_vlm.cloud.config import ServerConfig
    from speculative_vlm.cloud.server import serve
    from speculative_vlm.protocol.client import GrpcVerifier

    server = serve(ServerConfig(bind="127.0.0.1:0", require_auth=False),
                   engine=TargetEngine(vlm, exit_layers=[22], exit_heads=EXIT_HEADS))
    verifier = GrpcVerifier(f"127.0.0.1:{server.port}")
    try:
        for spec in REQUESTS:
            request = robot_request(*spec)
            result = SpeculativeDecoder(draft, verifier, verdict_timeout_s=60).generate(request)
            assert result.token_ids == alone(vlm, request), spec
    finally:
        verifier.close()
        server.stop(grace=0.0)


@pytest.mark.ros
def test_commands_of_the_shipped_vlm_pair_through_the_graph_equal_the_vlm_alone(vlm, rclpy_context, tmp_path):
    from robot_graph_harness import Graph

    graph = Graph(tmp_path, target=vlm, draft_model="command-draft", drafter={"perception": "image"})
    try:
        feedback: list = []
        response = graph.instruct("walk to the red ball", max_steps=1, feedback=feedback)
        texts = [f.feedback.command.text for f in feedback if f.feedback.command.text]
        assert texts, response.result.reason
        # The drafter sends the JPEG of the frame the graph publishes, and no scene text to the target.
        jpeg = cv2.imencode(".jpg", graph.frame_bgr)[1].tobytes()
        assert graph.prompts and graph.prompts[0].endswith("\nScene: ")  # the scene is in the pixels
        request = SessionRequest(prompt=graph.prompts[0], system=SYSTEM_PROMPT, image=jpeg, settings=SETTINGS)
        assert vlm.decode(alone(vlm, request)) == texts[0]
    finally:
        graph.close()
