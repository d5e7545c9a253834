"""Top-down plots of a run: the robot's path, the scene's objects and the goal, drawn and saved as PNG;
and the main job's bringup writes one for the scene its config uses."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib.figure import Figure
from speculative_vlm.bringup import load_config, write_topdown
from speculative_vlm.evaluation.plots import plot_topdown, save_topdown_png
from speculative_vlm.go2.scene import Room, SceneObject, load_scene

CONFIG = Path(__file__).resolve().parents[1] / "config" / "sim.yaml"
BALL = SceneObject("the red ball", "ball", (220, 30, 30), 3.0, 1.0, 0.15)
BOX = SceneObject("the blue box", "box", (30, 60, 220), 4.0, -1.5, 0.4)
PATH = [(0.0, 0.0), (0.5, 0.1), (1.0, 0.3), (1.6, 0.5), (2.1, 0.7)]
PATH_RGB = (31, 119, 180)  # matplotlib's tab:blue, the path's colour
GOAL_RGB = (255, 127, 14)  # tab:orange, the goal's ring


def _has_colour(png: Path, rgb: tuple[int, int, int]) -> bool:
    bgr = cv2.imread(str(png))
    assert bgr is not None, f"{png} is not a readable image"
    return bool(np.all(np.abs(bgr[..., ::-1].astype(int) - rgb) <= 3, axis=-1).any())


def test_plot_topdown_draws_the_path_every_object_and_names_the_goal():
    ax = Figure().add_subplot()
    plot_topdown(ax, PATH, [BALL, BOX], goal=BALL, room=Room())
    path_line = ax.lines[0]
    assert list(path_line.get_xdata()) == [p[0] for p in PATH] and list(path_line.get_ydata()) == [p[1] for p in PATH]
    assert {t.get_text() for t in ax.texts} >= {"the red ball", "the blue box"}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "goal: the red ball" in labels and "robot path (odom)" in labels and "start" in labels


def test_the_end_marker_points_along_the_final_heading_or_the_last_movement():
    given, moved = Figure().add_subplot(), Figure().add_subplot()
    plot_topdown(given, PATH, [], end_yaw=math.pi)  # facing -x, whatever the path did last
    plot_topdown(moved, [(0.0, 0.0), (0.0, 1.0)], [])  # last moved towards +y
    # A (3, 0, angle) marker is a triangle pointing up (+y) turned by angle degrees.
    assert given.lines[-1].get_marker()[2] == pytest.approx(90.0)
    assert moved.lines[-1].get_marker()[2] == pytest.approx(0.0)


def test_plot_topdown_without_a_goal_rings_nothing():
    ax = Figure().add_subplot()
    plot_topdown(ax, PATH, [BALL, BOX])
    assert not any(t.get_text().startswith("goal") for t in ax.get_legend().get_texts())


def test_save_topdown_png_writes_a_png_showing_the_path_the_objects_and_the_goal(tmp_path):
    out = save_topdown_png(tmp_path / "runs" / "topdown.png", PATH, [BALL, BOX], goal=BALL, room=Room())
    assert out == tmp_path / "runs" / "topdown.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rgb in (PATH_RGB, BALL.colour, BOX.colour, GOAL_RGB):
        assert _has_colour(out, rgb), rgb


def test_the_bringup_plots_the_configs_scene_with_the_object_the_instruction_names(tmp_path):
    config = load_config(CONFIG)
    config.instruction, config.plot = "walk to the blue box", str(tmp_path / "up.png")
    out = write_topdown(config, PATH, "test run")
    assert out.is_file()
    for obj in load_scene(None).objects:  # the sim config's scene, every object in its colour
        assert _has_colour(out, obj.colour), obj.name
    assert _has_colour(out, GOAL_RGB) and _has_colour(out, PATH_RGB)


def test_the_bringup_rings_no_goal_when_the_instruction_names_no_object(tmp_path):
    config = load_config(CONFIG)
    config.instruction, config.plot = "sit down", str(tmp_path / "up.png")
    assert not _has_colour(write_topdown(config, PATH, "test run"), GOAL_RGB)


@pytest.mark.parametrize(("instruction", "name"), [
    ("walk to the red ball", "the red ball"),
    ("Go to the RED BALL, then stop.", "the red ball"),
    ("turn to face the blue box", "the blue box"),
    ("sit down", None),
    ("walk to the redball", None),
])
def test_a_scene_finds_the_object_an_instruction_names(instruction, name):
    found = load_scene(None).named_in(instruction)
    assert (found.name if found else None) == name


def test_when_several_names_match_the_longest_wins():
    from speculative_vlm.go2.scene import Scene

    scene = Scene(objects=(SceneObject("the ball", "ball", (0, 0, 0), 1.0, 0.0, 0.1), BALL))
    assert scene.named_in("walk to the red ball") is BALL
    assert scene.named_in("kick the ball").name == "the ball"
