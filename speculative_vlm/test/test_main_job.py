"""The README's main job, end to end: `speculative-vlm up` on the sim config with the real models
(SmolLM2-135M-Instruct behind a local gRPC verifier, the shipped command draft on the robot side,
the simulated Go2 in its own process). The robot must end nearer the red ball than it started, and
the summary must say honestly how the goal ended: only the model saying done is success."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from go2_harness import go2_domain_id
from speculative_vlm.bringup import GOAL_NOT_ACHIEVED

pytestmark = [pytest.mark.ros, pytest.mark.slow]

CONFIG = Path(__file__).resolve().parents[1] / "config" / "sim.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_walk_to_the_red_ball_brings_the_robot_nearer_and_prints_a_summary(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    config["cloud_server"]["ros__parameters"]["bind"] = f"127.0.0.1:{port}"
    config["bridge"]["ros__parameters"]["cloud_address"] = f"127.0.0.1:{port}"
    for node in ("camera", "motion"):
        config[node]["ros__parameters"]["dds_domain_id"] = go2_domain_id()
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(config))
    plot = tmp_path / "plots" / "topdown.png"
    proc = subprocess.run([sys.executable, "-m", "speculative_vlm.cli", "up", str(path), "--plot", str(plot)],
                          capture_output=True, text=True, timeout=900, env=os.environ.copy())
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, GOAL_NOT_ACHIEVED), out[-3000:]
    steps = re.findall(r"^step (\d+): (\{.*\})  \[verified", out, re.M)
    max_steps = config["bringup"]["ros__parameters"]["max_steps"]
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1)) and steps, out[-3000:]
    assert "summary" in out
    outcome = re.search(r"^  outcome: (succeeded|failed \(([a-z ]+)\)): (.*)$", out, re.M)
    assert outcome, out[-3000:]
    executed = int(re.search(r"^  commands executed: (\d+);", out, re.M).group(1))
    if proc.returncode == 0:  # the model said done: the last step's command is DONE, not executed
        assert outcome.group(1) == "succeeded" and "said done" in outcome.group(3), out[-3000:]
        assert '"done"' in steps[-1][1] and executed == len(steps) - 1, out[-3000:]
    else:  # the stock 135M target rarely says done within the config's steps: the step limit ends it
        assert outcome.group(2) == "step limit", out[-3000:]
        assert f"step limit of {max_steps} commands reached" in outcome.group(3), out[-3000:]
        assert executed == len(steps) == max_steps, out[-3000:]
    m = re.search(r"robot ended at .*?, ([\d.]+) m from the red ball \(started ([\d.]+) m away\)", out)
    assert m, out[-3000:]
    ended, started = float(m.group(1)), float(m.group(2))
    assert f"  top-down plot: {plot.resolve()}" in out and plot.read_bytes()[:4] == b"\x89PNG", out[-3000:]
    # A 135M-parameter target steers poorly step by step (ANCHORS), but over the config's steps it
    # makes headway; what this checks is that verified commands reached the robot and moved it.
    assert ended < started, out[-3000:]
