"""The simulated Go2 as a DDS peer: unitree_sdk2py's own clients talk to it as to the robot."""

from __future__ import annotations

import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from go2_harness import SimProcess, join_domain
from polling import wait_for
from speculative_vlm.go2.sdk_backend import SportBackend, VideoBackend
from speculative_vlm.go2.sim_model import REFUSED, Mode

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def lying_sim():
    domain = join_domain()
    sim = SimProcess("--start-mode", "lie_down", "--width", "320", "--height", "240")
    backend = SportBackend(domain, "lo", timeout_s=1.0)
    assert wait_for(lambda: backend.latest_state() is not None, 10.0)
    yield backend
    backend.close()
    sim.stop()


def test_requests_get_the_robots_return_codes_over_dds(lying_sim):
    backend = lying_sim
    assert backend.latest_state().mode == Mode.LIE_DOWN
    assert backend.sit() == REFUSED  # cannot sit from lying down
    assert backend.stand_up() == 0
    assert wait_for(lambda: backend.latest_state().mode == Mode.JOINT_LOCK, 1.0)
    assert backend.balance_stand() == 0
    assert wait_for(lambda: backend.latest_state().mode == Mode.BALANCE_STAND, 1.0)


def test_move_streamed_over_dds_moves_the_reported_pose(lying_sim):
    backend = lying_sim
    backend.stand_up()
    backend.balance_stand()
    x0 = backend.latest_state().x
    for _ in range(25):
        assert backend.move(0.5, 0.0, 0.0) == 0
        time.sleep(0.04)
    assert backend.stop_move() == 0
    assert wait_for(lambda: backend.latest_state().vx_world == 0.0, 2.0)
    assert backend.latest_state().x - x0 == pytest.approx(0.5, abs=0.12)


def test_the_video_service_returns_a_jpeg_of_the_scene(lying_sim):
    code, jpeg = VideoBackend(join_domain(), "lo", timeout_s=2.0).get_jpeg()
    assert code == 0
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (240, 320, 3)


def test_the_command_line_tool_documents_its_options():
    out = subprocess.run(
        [sys.executable, "-m", "speculative_vlm.go2.sim", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for option in ("--domain-id", "--interface", "--scene", "--corrupt-every", "--move-timeout"):
        assert option in out.stdout
