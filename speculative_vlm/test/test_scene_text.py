"""The scene describer: structured scenes and camera frames become the same kind of sentence."""

import math

import cv2
import numpy as np
import pytest
from speculative_vlm.commands.scene_text import (
    NamedPoint,
    Pose,
    describe_image,
    describe_objects,
    detect_blobs,
)


def test_an_object_straight_ahead_is_described_with_its_distance():
    assert describe_objects([NamedPoint("red ball", 2.0, 0.0)]) == "red ball: 2.0 m away, straight ahead."


def test_bearing_is_positive_to_the_left_like_vyaw():
    text = describe_objects([("blue box", 0.0, 1.0), ("green cone", 1.0, -1.0)])
    assert "blue box: 1.0 m away, ahead, 90 degrees to the left" in text
    assert "green cone: 1.4 m away, ahead, 45 degrees to the right" in text


def test_objects_are_seen_from_the_robot_pose():
    # Facing +y from (1, 1): (1, 4) is 3 m straight ahead, (2, 1) is 1 m to the right.
    text = describe_objects([("red ball", 1.0, 4.0), ("blue box", 2.0, 1.0)], Pose(1.0, 1.0, math.pi / 2))
    assert "red ball: 3.0 m away, straight ahead" in text
    assert "blue box: 1.0 m away, ahead, 90 degrees to the right" in text


def test_objects_behind_the_robot_say_behind():
    assert "behind, 180 degrees" in describe_objects([("red ball", -2.0, 0.01)])


def test_nearest_object_comes_first():
    text = describe_objects([("far ball", 5.0, 0.0), ("near box", 1.0, 0.0)])
    assert text.index("near box") < text.index("far ball")


def test_scene_file_names_lose_their_article():
    assert describe_objects([("the red ball", 1.0, 0.0)]).startswith("red ball:")


def test_an_empty_scene_says_so():
    assert describe_objects([]) == "no coloured objects in view."


def _frame() -> np.ndarray:
    # Grey floor and sky, a red disc low on the left, a large blue square low on the right.
    img = np.full((480, 640, 3), (150, 150, 150), np.uint8)
    img[:240] = (215, 225, 235)
    cv2.circle(img, (160, 300), 30, (30, 30, 220), -1)
    cv2.rectangle(img, (420, 300), (540, 420), (220, 60, 30), -1)
    return img


def test_image_blobs_get_colour_shape_and_side():
    blobs = {b.colour: b for b in detect_blobs(_frame())}
    assert set(blobs) == {"red", "blue"}
    assert blobs["red"].shape == "ball" and blobs["red"].bearing > 0
    assert blobs["blue"].shape == "box" and blobs["blue"].bearing < 0


def test_an_object_meeting_the_floor_lower_in_the_frame_is_nearer():
    blobs = {b.colour: b for b in detect_blobs(_frame())}
    # The box touches the floor at row 420, the ball at row 330: the box is nearer.
    assert blobs["blue"].distance < blobs["red"].distance


def test_describe_image_reads_like_describe_objects():
    text = describe_image(_frame())
    assert text.startswith("blue box: about ")
    assert "red ball: about " in text and "to the left" in text


def test_a_grey_frame_has_no_objects():
    assert describe_image(np.full((120, 160, 3), 128, np.uint8)) == "no coloured objects in view."


def test_a_non_bgr_array_is_refused():
    with pytest.raises(ValueError, match="BGR"):
        describe_image(np.zeros((10, 10), np.uint8))


def test_the_simulated_camera_is_described_close_to_the_ground_truth():
    scene_mod = pytest.importorskip("speculative_vlm.go2.scene")
    render = pytest.importorskip("speculative_vlm.go2.render")
    scene = scene_mod.load_scene()
    pose = (1.0, 0.0, 0.3)
    seen = {b.name: b for b in detect_blobs(render.render_bgr(scene, *pose))}
    for obj in scene.objects:
        name = obj.name.removeprefix("the ")
        assert name in seen, f"{name} not found in {sorted(seen)}"
        dx, dy = obj.x - pose[0], obj.y - pose[1]
        fwd = dx * math.cos(pose[2]) + dy * math.sin(pose[2])
        lat = -dx * math.sin(pose[2]) + dy * math.cos(pose[2])
        assert seen[name].bearing == pytest.approx(math.degrees(math.atan2(lat, fwd)), abs=4)
        assert seen[name].distance == pytest.approx(math.hypot(fwd, lat), rel=0.25)


def test_a_red_ball_seen_through_jpeg_is_still_a_ball():
    # JPEG puts a red object's edge pixels just below hue 180 and its body just above 0: red is one
    # band on both sides of the wrap, or the ball's outline is cut up and its shape lost.
    scene_mod = pytest.importorskip("speculative_vlm.go2.scene")
    render = pytest.importorskip("speculative_vlm.go2.render")
    ball = scene_mod.SceneObject("the red ball", "ball", (220, 30, 30), 1.2, 0.1, 0.18)
    scene = scene_mod.Scene(objects=(ball,))
    jpeg = render.encode_jpeg(render.render_bgr(scene, 0.0, 0.0, 0.0))
    frame = cv2.resize(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), (320, 240),
                       interpolation=cv2.INTER_AREA)
    assert [b.name for b in detect_blobs(frame)] == ["red ball"]


def test_a_small_distant_cone_is_still_a_cone():
    # A cone 4 m away is a few pixels tall and blurred round by JPEG; its narrow top gives it away.
    scene_mod = pytest.importorskip("speculative_vlm.go2.scene")
    render = pytest.importorskip("speculative_vlm.go2.render")
    cone = scene_mod.SceneObject("the blue cone", "cone", (30, 60, 220), 4.0, 0.3, 0.17)
    jpeg = render.encode_jpeg(render.render_bgr(scene_mod.Scene(objects=(cone,)), 0.0, 0.0, 0.0))
    frame = cv2.resize(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), (320, 240),
                       interpolation=cv2.INTER_AREA)
    assert [b.name for b in detect_blobs(frame)] == ["blue cone"]
