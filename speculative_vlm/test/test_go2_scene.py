"""Scenes of the simulated Go2 and the first-person view rendered from them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from speculative_vlm.go2.render import CameraModel, encode_jpeg, render_bgr
from speculative_vlm.go2.scene import SceneError, load_scene, scene_from_dict


def red_columns(img: np.ndarray) -> np.ndarray:
    red = (img[:, :, 2] > 150) & (img[:, :, 1] < 80) & (img[:, :, 0] < 80)
    return np.nonzero(red)[1]


def test_the_default_scene_has_the_red_ball_a_few_metres_ahead_left():
    scene = load_scene()
    ball = scene.find("the red ball")
    assert ball.x > 1.5 and ball.y > 0.0
    assert 2.0 <= scene.distance_to("the red ball", 0.0, 0.0) <= 5.0
    assert {o.name for o in scene.objects} >= {"the red ball", "the blue box", "the green cone"}


def test_the_red_ball_is_rendered_left_of_centre_from_the_start_pose():
    img = render_bgr(load_scene(), 0.0, 0.0, 0.0, CameraModel(320, 240))
    assert img.shape == (240, 320, 3) and img.dtype == np.uint8
    cols = red_columns(img)
    assert cols.size > 10 and cols.mean() < 160


def test_turning_towards_the_ball_centres_it_and_walking_closer_makes_it_bigger():
    scene = load_scene()
    ball = scene.find("the red ball")
    yaw = math.atan2(ball.y, ball.x)
    far = red_columns(render_bgr(scene, 0.0, 0.0, yaw, CameraModel(320, 240)))
    near = red_columns(render_bgr(scene, ball.x * 0.6, ball.y * 0.6, yaw, CameraModel(320, 240)))
    assert abs(far.mean() - 159.5) < 5
    assert near.size > 2 * far.size


def test_an_object_behind_the_robot_is_not_drawn():
    img = render_bgr(load_scene(), 0.0, 0.0, math.pi, CameraModel(320, 240))
    assert red_columns(img).size == 0


def test_the_rendered_view_encodes_to_a_jpeg():
    data = encode_jpeg(render_bgr(load_scene(), 0.0, 0.0, 0.0, CameraModel(160, 120)))
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"objects": [{"name": "x", "shape": "pyramid", "colour": [1, 2, 3], "x": 1, "y": 0}]}, "shape"),
        ({"objects": [{"name": "x", "shape": "ball", "colour": [1, 2], "x": 1, "y": 0}]}, "colour"),
        ({"objects": [{"name": "x", "shape": "ball", "colour": [1, 2, 3], "x": 99, "y": 0}]}, "outside the room"),
        ({"room": {"x_min": 5, "x_max": 1}}, "inverted"),
        (
            {"objects": [{"name": "a", "shape": "ball", "colour": [1, 2, 3], "x": 1, "y": 0}] * 2},
            "unique",
        ),
    ],
)
def test_a_bad_scene_is_refused_with_the_reason(data, problem):
    with pytest.raises(SceneError, match=problem):
        scene_from_dict(data)


def test_a_scene_file_is_read_from_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("objects:\n  - {name: a chair, shape: box, colour: [200, 0, 0], x: 2.0, y: -1.0, size: 0.5}\n")
    scene = load_scene(path)
    assert scene.distance_to("a chair", 2.0, 0.0) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="a chair"):
        scene.find("a table")


def test_a_packaged_scene_is_found_by_name_and_an_unknown_name_lists_the_choices():
    assert load_scene("default") == load_scene()
    with pytest.raises(SceneError, match="default"):
        load_scene("moon_base")
