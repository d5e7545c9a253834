"""An episode through the full ROS graph ends as it does in-process (tiny models, real DDS and gRPC)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from speculative_vlm.evaluation.episodes import generate_episodes
from speculative_vlm.evaluation.graph import run_graph_episodes
from speculative_vlm.evaluation.phrasings import HELDOUT
from speculative_vlm.evaluation.policies import ModelPolicy
from speculative_vlm.evaluation.runner import run_episode
from speculative_vlm.evaluation.splits import make_splits
from speculative_vlm.evaluation.world import SIM_CONFIG, WorldConfig

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_a_held_out_episode_through_the_graph_gets_the_same_command_verdict_and_end_pose(tmp_path):
    # One step: the same first prompt must give the same command, which must move the robot the same way.
    # (Later steps can differ: in real time the drafter may see a frame from before the robot came to rest.)
    from speculative_vlm.benchmark.quick_models import build

    target, draft = build(tmp_path)
    episode = replace(generate_episodes(make_splits(0)[HELDOUT], 1, seed=0)[0], max_steps=1)
    policy = ModelPolicy(target, draft, name="tiny")
    try:
        mine = run_episode(episode, policy, WorldConfig.from_config())
    finally:
        policy.close()
    [row] = run_graph_episodes([episode], f"{target}+{draft}", SIM_CONFIG, [mine], "tiny")
    assert row["graph_texts"] == [mine.steps[0].text] and row["same"]
    assert row["end_gap_m"] < 0.15, row
