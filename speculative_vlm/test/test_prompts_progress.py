"""The progress line of the robot prompt: odometry since the instruction, in the start frame."""

from __future__ import annotations

import math

from speculative_vlm.commands import prompts
from speculative_vlm.commands.scene_text import Pose


def test_user_message_without_progress_is_unchanged():
    assert prompts.user_message("sit", "no coloured objects in view.") == (
        "Instruction: sit\nScene: no coloured objects in view.")


def test_user_message_with_progress_adds_a_third_line():
    text = prompts.user_message("sit", "no coloured objects in view.", "moved 0.0 m forward")
    assert text.splitlines() == ["Instruction: sit", "Scene: no coloured objects in view.",
                                 "Progress: moved 0.0 m forward"]


def test_progress_at_the_start_says_nothing_has_happened():
    p = prompts.Progress(Pose(3.0, -1.0, 2.0))
    p.update(Pose(3.0, -1.0, 2.0))
    assert p.text() == "moved 0.0 m forward and 0.0 m to the left, turned 0 degrees; last command: none"


def test_progress_is_measured_in_the_frame_the_robot_started_in():
    p = prompts.Progress(Pose(1.0, 1.0, math.pi / 2))  # facing +y
    p.update(Pose(1.3, 2.2, math.pi / 2))  # 1.2 m along +y (forward), 0.3 m towards +x (its right)
    assert p.text("move") == "moved 1.2 m forward and 0.3 m to the right, turned 0 degrees; last command: move"


def test_walking_backwards_reads_back():
    p = prompts.Progress(Pose(0.0, 0.0, 0.0))
    p.update(Pose(-0.5, 0.0, 0.0))
    assert p.text().startswith("moved 0.5 m back and 0.0 m to the left")


def test_turning_is_unwrapped_so_a_full_turn_reads_360_degrees():
    p = prompts.Progress(Pose(0.0, 0.0, 0.0))
    for step in range(1, 13):  # 12 steps of 30 degrees to the left
        p.update(Pose(0.0, 0.0, math.atan2(math.sin(step * math.pi / 6), math.cos(step * math.pi / 6))))
    assert "turned 360 degrees to the left" in p.text()


def test_a_right_turn_reads_right():
    p = prompts.Progress(Pose(0.0, 0.0, 3.0))
    p.update(Pose(0.0, 0.0, 3.0 - math.radians(45)))
    assert "turned 45 degrees to the right" in p.text("move")
