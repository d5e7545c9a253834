"""The in-process world executes a command as the motion node and the simulated Go2 would."""

from __future__ import annotations

import math

import pytest
from speculative_vlm.commands.scene_text import describe_image
from speculative_vlm.commands.schema import Action, LocomotionCommand
from speculative_vlm.evaluation.world import SimWorld, WorldConfig
from speculative_vlm.go2.scene import Scene, SceneObject
from speculative_vlm.go2.sim_model import Mode

CONFIG = WorldConfig.from_config()
BALL = SceneObject("the red ball", "ball", (220, 30, 30), 2.0, 0.0, 0.2)


def world(mode: Mode = Mode.BALANCE_STAND) -> SimWorld:
    return SimWorld(Scene(objects=(BALL,)), mode, CONFIG)


def test_the_sim_configs_limits_are_the_motion_nodes():
    assert (CONFIG.limits.max_vx, CONFIG.limits.min_vx, CONFIG.limits.max_vyaw) == (0.8, -0.3, 1.0)
    assert CONFIG.frame_size == (320, 240)
    assert CONFIG.progress_line is True  # the drafter's, in config/sim.yaml (the trained target expects it)


def test_the_prompt_has_a_progress_line_exactly_when_the_config_says_so():
    from dataclasses import replace

    from speculative_vlm.evaluation.episodes import generate_episodes
    from speculative_vlm.evaluation.policies import ExpertPolicy
    from speculative_vlm.evaluation.runner import run_episode
    from speculative_vlm.evaluation.splits import make_splits

    episode = generate_episodes(make_splits(0)["train"], 4, seed=0)[3]  # walk: several steps
    for on in (False, True):
        seen: list[str] = []
        result = run_episode(episode, ExpertPolicy(CONFIG.limits), replace(CONFIG, progress_line=on),
                             perception="scene_text", on_step=lambda obs, _r, seen=seen: seen.append(obs.prompt()))
        assert result.success and len(seen) > 1
        assert all(("\nProgress: moved " in p) == on for p in seen)


def test_a_move_covers_speed_times_duration_and_the_robot_comes_to_rest():
    w = world()
    w.execute(LocomotionCommand(Action.MOVE, 0.5, 0.0, 0.0, 2.0))
    assert w.pose().x == pytest.approx(1.0, abs=0.02)
    s = w.model.snapshot()
    assert s.vx == 0.0 and s.mode == Mode.BALANCE_STAND


def test_a_command_beyond_the_limits_runs_clamped():
    w = world()
    executed = w.execute(LocomotionCommand(Action.MOVE, 1.0, 0.0, 1.5, 1.0))
    assert (executed.vx, executed.vyaw) == (0.8, 1.0)
    assert w.progress.turned == pytest.approx(1.0, abs=0.02)


def test_turning_is_tracked_unwrapped_past_a_full_turn():
    w = world()
    for _ in range(7):
        w.execute(LocomotionCommand(Action.MOVE, 0.0, 0.0, 1.0, 1.0))
    assert w.progress.turned == pytest.approx(7.0, abs=0.1)
    assert "turned 401 degrees to the left" in w.progress.text()


def test_sitting_ignores_moves_as_the_robot_does():
    w = world()
    w.execute(LocomotionCommand(Action.SIT))
    w.execute(LocomotionCommand(Action.MOVE, 0.5, 0.0, 0.0, 1.0))
    assert w.mode() == Mode.SIT and w.max_offset == 0.0


def test_standing_up_from_lying_down_ends_in_balance_stand():
    w = world(Mode.LIE_DOWN)
    w.execute(LocomotionCommand(Action.STAND_UP))
    assert w.mode() == Mode.BALANCE_STAND


def test_the_camera_frame_is_the_camera_nodes_size_and_shows_the_ball():
    frame = world().frame_bgr()
    assert frame.shape == (240, 320, 3)
    assert describe_image(frame).startswith("red ball: about 2.0 m away, straight ahead")


def test_done_sends_nothing_and_takes_no_time():
    w = world()
    w.execute(LocomotionCommand(Action.DONE))
    assert w.clock.now == 0.0 and not w.model.snapshot().counts


def test_the_path_is_sampled_for_plots():
    w = world()
    w.execute(LocomotionCommand(Action.MOVE, 0.5, 0.0, 0.0, 2.0))
    assert len(w.path) > 15 and math.hypot(w.path[-1][0], w.path[-1][1]) == pytest.approx(1.0, abs=0.02)
