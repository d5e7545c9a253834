"""Drafter + bridge (in-process target) + a probe recording the spec/* traffic over real DDS
(test_drafter_exchange, test_drafter_method, test_drafter_motion)."""

from __future__ import annotations

import time
import uuid

from go2_harness import Spinner
from polling import wait_for
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from speculative_vlm.nodes.ros_verifier import SPEC_QOS
from tiny_models import tiny_pair

from speculative_vlm_msgs.action import Instruct
from speculative_vlm_msgs.msg import DecodingStats, DraftBlock, Verdict


def nanoseconds(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class Exchange:
    """Drafter + bridge (in-process target) + a probe that records the spec/* traffic, in a process
    where rclpy is initialised (the ``rclpy_context`` fixture)."""

    def __init__(self, tmp_path) -> None:
        from speculative_vlm.decoding.inprocess import InProcessVerifier
        from speculative_vlm.decoding.target_engine import TargetEngine
        from speculative_vlm.go2.render import CameraModel, render_bgr
        from speculative_vlm.go2.scene import load_scene
        from speculative_vlm.nodes.bridge import BridgeNode
        from speculative_vlm.nodes.drafter import DrafterNode
        from speculative_vlm.nodes.image_conversion import numpy_to_image

        target, draft = tiny_pair(seed=9, noise=0.02, draft_seed=4)
        draft.model.save_pretrained(tmp_path / "draft")
        draft.tokenizer.save_pretrained(tmp_path / "draft")
        self.verifier = InProcessVerifier(TargetEngine(target, exit_layers=[2], max_batch=4))
        ns = "/t" + uuid.uuid4().hex[:8]
        self.bridge = BridgeNode(verifier=self.verifier, namespace=ns)
        self.drafter = DrafterNode(namespace=ns, parameter_overrides=[
            Parameter("draft_model", value=str(tmp_path / "draft")), Parameter("max_new_tokens", value=64),
            Parameter("adaptive_draft_length", value=False), Parameter("draft_length", value=3),
            Parameter("early_confidence", value=0.0), Parameter("verdict_timeout_s", value=10.0),
        ])
        self.probe = Node("probe", namespace=ns)
        self.drafts: list[DraftBlock] = []
        self.verdicts: list[Verdict] = []
        self.stats: list[DecodingStats] = []
        self.probe.create_subscription(DraftBlock, "spec/draft", self.drafts.append, SPEC_QOS)
        self.probe.create_subscription(Verdict, "spec/verdict", self.verdicts.append, SPEC_QOS)
        self.probe.create_subscription(DecodingStats, "drafter/stats", self.stats.append, 10)
        frame = numpy_to_image(render_bgr(load_scene(None), 0.0, 0.0, 0.0, CameraModel(width=160, height=120)), "bgr8")
        frame_pub = self.probe.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
        self.probe.create_timer(0.2, lambda: frame_pub.publish(frame))
        self.spinner = Spinner(self.bridge, self.drafter, self.probe)
        self.client = ActionClient(self.probe, Instruct, "instruct")
        assert self.client.wait_for_server(timeout_sec=30)
        assert self.drafter._loaded.wait(60) and self.drafter._decoder is not None, self.drafter._load_error

    def one_step(self) -> tuple[list[DraftBlock], list[Verdict], DecodingStats]:
        """Run a goal until its first step's statistics are published, then cancel it."""
        n_drafts, n_verdicts, n_stats = len(self.drafts), len(self.verdicts), len(self.stats)
        send = self.client.send_goal_async(Instruct.Goal(instruction="walk to the red ball", max_steps=1))
        assert wait_for(send.done, 30.0) and send.result().accepted
        result = send.result().get_result_async()
        assert wait_for(lambda: len(self.stats) > n_stats or result.done(), 120.0), "no drafter/stats"
        assert len(self.stats) > n_stats, f"the goal ended without a step: {result.result().result.reason}"
        cancel = send.result().cancel_goal_async()
        assert wait_for(cancel.done, 10.0)
        assert wait_for(result.done, 30.0), "the goal did not end after the cancel"
        time.sleep(0.2)  # late verdicts of the cancelled session
        return self.drafts[n_drafts:], self.verdicts[n_verdicts:], self.stats[n_stats]

    def set_parameter(self, param: Parameter) -> None:
        client = self.probe.create_client(SetParameters, "drafter/set_parameters")
        assert client.wait_for_service(timeout_sec=10.0)
        future = client.call_async(SetParameters.Request(parameters=[param.to_parameter_msg()]))
        assert wait_for(future.done, 10.0)
        [result] = future.result().results
        assert result.successful, result.reason
        self.probe.destroy_client(client)

    def close(self) -> None:
        self.client.destroy()
        self.spinner.shutdown()
        for node in (self.drafter, self.bridge, self.probe):
            node.destroy_node()
        self.verifier.shutdown()
