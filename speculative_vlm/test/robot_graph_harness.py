"""The robot graph of the end-to-end tests: the simulated Go2, a gRPC verifier behind the netem delay
proxy and the robot nodes in this process (test_robot_graph, test_bridge_streaming, test_robot_restart)."""

from __future__ import annotations

import math

from go2_harness import SimProcess, Spinner, go2_domain_id
from nav_msgs.msg import Odometry
from polling import result_of
from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from speculative_vlm.benchmark.netem import DelayProxy
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.cloud.server import serve
from speculative_vlm.decoding.target_engine import TargetEngine
from std_msgs.msg import String
from tiny_models import tiny_pair

from speculative_vlm_msgs.action import Instruct
from speculative_vlm_msgs.msg import LocomotionCommand

Outcome = Instruct.Result

MAX_VX, MIN_VX, MAX_VY, MAX_VYAW, MAX_DURATION = 0.6, -0.3, 0.3, 0.8, 0.6


def _params(**values) -> list[Parameter]:
    return [Parameter(k, value=v) for k, v in values.items()]


class Graph:
    """Sim Go2 + verifier server + the robot nodes in this process, torn down together; rclpy is
    initialised by the ``rclpy_context`` fixture."""

    def __init__(self, tmp_path, target=None, draft_model: str = "", drafter: dict | None = None):
        """``target`` (a ModelAdapter), ``draft_model`` (a folder or store name) and ``drafter`` (more drafter
        parameters) replace the tiny pair, e.g. with the shipped VLM pair and ``perception="image"``."""
        if target is None:
            # Seed 9 answers the start frame's prompts with MOVE commands, so the robot moves.
            self.target, draft = tiny_pair(seed=9, noise=0.02, draft_seed=4)
            self.draft_dir = tmp_path / "draft"
            draft.model.save_pretrained(self.draft_dir)
            draft.tokenizer.save_pretrained(self.draft_dir)
            draft_model = str(self.draft_dir)
        else:
            self.target = target
        self.sim = SimProcess("--width", "160", "--height", "120")
        self.port = None
        self.server = None
        self.start_server()
        # The bridge reaches the verifier through a loopback link whose delay a test can raise.
        self.link = DelayProxy(("127.0.0.1", self.port)).start()
        domain = go2_domain_id()
        from speculative_vlm.nodes.bridge import BridgeNode
        from speculative_vlm.nodes.camera import CameraNode
        from speculative_vlm.nodes.drafter import DrafterNode
        from speculative_vlm.nodes.motion import MotionNode

        self.nodes = [
            MotionNode(parameter_overrides=_params(
                dds_domain_id=domain, autostart=True, max_vx=MAX_VX, min_vx=MIN_VX, max_vy=MAX_VY,
                max_vyaw=MAX_VYAW, max_duration_s=MAX_DURATION)),
            BridgeNode(parameter_overrides=_params(cloud_address=self.link.address, deadline_s=3.0)),
            # No progress line: every step of every goal asks the same question, so what the tiny
            # target answers (MOVE) does not depend on where earlier tests left the robot.
            DrafterNode(parameter_overrides=_params(**{
                "draft_model": draft_model, "max_new_tokens": 64, "verdict_timeout_s": 3.0, "max_steps": 2,
                "draft_length": 3, "adaptive_draft_length": False, "progress_line": False, **(drafter or {})})),
        ]
        self.camera_params = _params(dds_domain_id=domain, rate_hz=5.0, width=160, height=120)
        self.camera_class = CameraNode
        self.probe = Node("graph_probe")
        self.spinner = Spinner(*self.nodes, self.probe)
        self.client = ActionClient(self.probe, Instruct, "instruct")
        assert self.client.wait_for_server(timeout_sec=30)
        self.odom: list[Odometry] = []
        self.active: list[LocomotionCommand] = []
        self.prompts: list[str] = []
        self.probe.create_subscription(Odometry, "odom", self.odom.append, 50)
        self.commands: list[LocomotionCommand] = []  # everything sent to the motion node
        self.probe.create_subscription(LocomotionCommand, "motion/command", self.commands.append, 50)
        from speculative_vlm.nodes.motion import LATCHED

        self.probe.create_subscription(LocomotionCommand, "motion/active_command", self.active.append, LATCHED)
        self.probe.create_subscription(String, "drafter/prompt", lambda m: self.prompts.append(m.data), 10)
        # A fixed frame (the start view, rendered by the sim's renderer) keeps prompts repeatable.
        from speculative_vlm.go2.render import CameraModel, render_bgr
        from speculative_vlm.go2.scene import load_scene
        from speculative_vlm.nodes.image_conversion import numpy_to_image

        self.frame_bgr = render_bgr(load_scene(None), 0.0, 0.0, 0.0, CameraModel(width=160, height=120))
        frame = numpy_to_image(self.frame_bgr, "bgr8")
        self.frame_pub = self.probe.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
        self.frame_timer = self.probe.create_timer(0.2, lambda: self.frame_pub.publish(frame))

    def start_server(self) -> None:
        bind = f"127.0.0.1:{self.port or 0}"
        engine = TargetEngine(self.target, exit_layers=[2], max_batch=4)
        self.server = serve(ServerConfig(bind=bind, require_auth=False, max_wait_ms=1.0), engine=engine)
        self.port = self.server.port

    def stop_server(self) -> None:
        self.server.stop(grace=0.0)

    def instruct(self, instruction: str, max_steps: int, feedback: list | None = None):
        goal = Instruct.Goal(instruction=instruction, max_steps=max_steps)
        cb = feedback.append if feedback is not None else None
        send = self.client.send_goal_async(goal, feedback_callback=cb)
        handle = result_of(send, 60)
        assert handle.accepted
        return result_of(handle.get_result_async(), 120)

    def speed(self) -> float:
        if not self.odom:
            return float("nan")
        t = self.odom[-1].twist.twist
        return math.hypot(t.linear.x, t.linear.y)

    def close(self) -> None:
        self.client.destroy()
        for n in reversed(self.nodes):
            n.destroy_node()
        self.spinner.shutdown()
        self.probe.destroy_node()
        self.server.stop(grace=0.0)
        self.link.stop()
        self.sim.stop()
