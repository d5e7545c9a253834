"""The VLM target's training frames (training/vlm_frames.py, target_data.frame_examples): train split only,
rendered from the pose of each step, varied, reproducible, and plain frames equal to what eval sends."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from speculative_vlm.commands.scene_text import Pose
from speculative_vlm.evaluation.episodes import generate_episodes
from speculative_vlm.evaluation.phrasings import TRAIN
from speculative_vlm.evaluation.runner import observe
from speculative_vlm.evaluation.splits import heldout_combos, make_splits
from speculative_vlm.evaluation.world import SimWorld, WorldConfig
from speculative_vlm.go2.render import CameraModel, RenderStyle, render_bgr
from speculative_vlm.go2.scene import Scene, SceneObject
from speculative_vlm.training import target_data, vlm_frames

RECIPE = target_data.DataRecipe(episodes=6, perturbed_episodes=2, perturb=0.5, seed=1)
CONFIG = replace(WorldConfig.from_config(), progress_line=True)
TRAIN_COMBOS = make_splits(0)[TRAIN].combos


@pytest.fixture(scope="module")
def frames():
    return target_data.frame_examples(RECIPE, CONFIG, None, log=lambda _: None)


def looks(frames, count: int = 60) -> list[tuple[target_data.FrameExample, vlm_frames.Look]]:
    out = []
    for i in range(count):
        f = frames[i % len(frames)]
        look = vlm_frames.random_look(random.Random(i), f.episode.scene, f.pose, TRAIN_COMBOS,
                                      f.episode.intent.target or "")
        out.append((f, look))
    return out


def test_frame_examples_come_from_train_split_episodes_only(frames):
    held = set(heldout_combos(RECIPE.split_seed))
    assert frames and all(f.example.episode.startswith("train-") and f.episode.id == f.example.episode for f in frames)
    for f in frames:
        assert not {o.name.removeprefix("the ") for o in f.episode.scene.objects} & held
        assert (f.episode.intent.target or "") not in held
    assert max(int(f.episode.id.split("-")[1]) for f in frames) >= RECIPE.episodes  # perturbed rollouts too


def test_each_example_records_the_pose_its_frame_was_taken_from(frames):
    """A camera at the recorded pose sees what the rollout's describer saw."""
    from speculative_vlm.commands.scene_text import describe_image

    moved = [f for f in frames if f.example.step > 1][:6]
    assert moved
    for f in moved:
        scene = replace(f.episode.scene, start_x=f.example.x, start_y=f.example.y, start_yaw=f.example.yaw)
        assert describe_image(SimWorld(scene, f.episode.start_mode, CONFIG).frame_bgr()) == f.example.scene_text


def test_steps_with_the_same_prompt_from_another_pose_are_kept_for_the_vlm():
    text = target_data.expert_examples(RECIPE, CONFIG, log=lambda _: None)
    both = target_data.expert_examples(RECIPE, CONFIG, log=lambda _: None, distinct_frames=True)
    assert len(both) >= len(text)
    assert len({(e.prompt, e.answer, e.x, e.y, e.yaw) for e in both}) == len(both)


def test_plain_frames_are_byte_identical_to_the_frames_eval_sends_a_vlm_target():
    for episode in generate_episodes(make_splits(0)[TRAIN], 4, 2):
        world = SimWorld(episode.scene, episode.start_mode, CONFIG)
        sent = observe(episode, world, 1, "", "image").frame_jpeg
        assert vlm_frames.render_frame(episode.scene, world.pose(), vlm_frames.PLAIN, CONFIG) == sent


def test_looks_are_reproducible_from_their_seed_and_vary(frames):
    f = frames[0]
    a = vlm_frames.random_look(random.Random("x"), f.episode.scene, f.pose, TRAIN_COMBOS)
    b = vlm_frames.random_look(random.Random("x"), f.episode.scene, f.pose, TRAIN_COMBOS)
    assert a == b
    assert vlm_frames.render_frame(f.episode.scene, f.pose, a, CONFIG) == \
        vlm_frames.render_frame(f.episode.scene, f.pose, b, CONFIG)
    drawn = [look for _, look in looks(frames)]
    varied = [look for look in drawn if look.varied]
    assert 0 < len(drawn) - len(varied) < len(drawn) / 3  # some plain frames, most varied
    assert len({look.style for look in varied}) > len(varied) / 2  # rooms differ
    assert len({round(look.gain, 2) for look in varied}) > len(varied) / 2
    assert any(look.noise > 4 for look in varied) and any(look.blur > 0 for look in varied)
    assert min(look.quality for look in varied) < 60 < max(look.quality for look in varied)
    assert any(look.occluded for look in varied) and any(look.extras > bool(look.occluded) for look in varied)


def test_picture_only_objects_take_train_combinations_never_present_or_named(frames):
    for f, look in looks(frames, 120):
        if not look.varied:
            continue
        present = {o.name.removeprefix("the ") for o in f.episode.scene.objects}
        extras = [o.name.removeprefix("picture ") for o in look.objects if o.name.startswith("picture ")]
        assert len(extras) == look.extras
        assert not set(extras) & (present | {f.episode.intent.target or ""})
        assert set(extras) <= set(TRAIN_COMBOS)


def _pixels_of(image: np.ndarray, rgb) -> int:
    bgr = np.array(rgb[::-1], np.int32)
    return int((np.abs(image.astype(np.int32) - bgr).sum(-1) < 40).sum())


@pytest.mark.parametrize("shape, size, distance", [("ball", 0.2, 3.0), ("box", 0.4, 2.0), ("cone", 0.18, 4.0)])
def test_an_occluder_hides_part_of_the_object_behind_it_and_never_all(shape, size, distance):
    target = SceneObject(f"the red {shape}", shape, (220, 30, 30), distance, 0.3, size)
    scene, camera = Scene(objects=(target,)), CameraModel(320, 240)
    variation = vlm_frames.Variation(plain=0.0, occluder=1.0, distractors=0.0)
    alone = _pixels_of(render_bgr(scene, 0, 0, 0, camera), target.colour)
    visible = []
    for seed in range(40):
        look = vlm_frames.random_look(random.Random(seed), scene, Pose(), ["blue box", "green cone", "yellow ball"],
                                      "", variation)
        assert look.occluded == target.name
        occluder = [o for o in look.objects if o.name.startswith("picture ")]
        visible.append(_pixels_of(render_bgr(replace(scene, objects=(target, *occluder)), 0, 0, 0, camera),
                                  target.colour) / alone)
    assert min(visible) > 0.0
    assert sum(0.1 < v < 0.95 for v in visible) >= 0.75 * len(visible)


def test_the_default_style_is_the_simulators_room():
    image = render_bgr(Scene(), 0.0, 0.0, 0.0, CameraModel(64, 48))
    assert tuple(image[0, 32]) == RenderStyle().sky == (235, 225, 215)
    floor = {tuple(p) for p in image[-1]}
    assert floor <= {(150, 150, 150), (120, 120, 120)}
    styled = render_bgr(Scene(), 0.0, 0.0, 0.0, CameraModel(64, 48), RenderStyle(sky=(10, 20, 30)))
    assert tuple(styled[0, 32]) == (10, 20, 30)
