"""Stage 1 of train-target --vision (training/vision_pretrain.py): region labels and the tower's pretraining."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from speculative_vlm.evaluation.splits import TRAIN, make_splits
from speculative_vlm.evaluation.world import WorldConfig
from speculative_vlm.training import train_vlm, vlm_frames
from speculative_vlm.training.vision_pretrain import COLOURS, SHAPES, pretrain_vision, region_labels
from tiny_vlm_target import tiny_vlm_target

CONFIG = WorldConfig.from_config()


def test_a_region_is_labelled_with_the_colour_and_shape_that_cover_it():
    frame = np.full((240, 320, 3), 128, np.uint8)  # grey: no colour
    cv2.rectangle(frame, (10, 10), (50, 45), (0, 0, 255), -1)  # a red box in the top-left region
    cv2.circle(frame, (280, 200), 18, (255, 0, 0), -1)  # a blue ball in the bottom-right one
    colours, shapes = region_labels(frame, 4)
    assert COLOURS[colours[0]] == "red" and SHAPES[shapes[0]] == "box"
    assert COLOURS[colours[15]] == "blue" and SHAPES[shapes[15]] == "ball"
    assert all(c == 0 and s == 0 for i, (c, s) in enumerate(zip(colours, shapes, strict=True)) if i not in (0, 15))


def test_image_tokens_follow_the_regions_in_row_major_order():
    """The labels' order is the connector's: token t is the patches of region (t // side, t % side)."""
    vlm, _, _ = tiny_vlm_target(seed=1)
    side, scale = 4, vlm.config.scale_factor
    patches = torch.arange(float((side * scale) ** 2)).view(1, -1, 1)
    tokens = vlm.model.connector.pixel_shuffle(patches, scale)[0]
    width = side * scale
    for t, token in enumerate(tokens):
        regions = {(int(i) // width // scale, int(i) % width // scale) for i in token}
        assert regions == {(t // side, t % side)}


@pytest.fixture(scope="module")
def rows():
    from speculative_vlm.training.target_data import DataRecipe, frame_examples

    _, processor, _ = tiny_vlm_target(seed=2)
    frames = frame_examples(DataRecipe(episodes=3, perturbed_episodes=0), CONFIG, None, lambda _: None)
    return train_vlm.tokenize_frames(frames, processor, stop_id=2)


def test_pretraining_moves_the_tower_and_connector_only_and_reports_before_and_after(rows):
    vlm, processor, _ = tiny_vlm_target(seed=2)
    looks = train_vlm.FrameSteps(processor, CONFIG, 49152, 2, 1, vlm_frames.Variation(), make_splits(0)[TRAIN].combos)
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    lines: list[str] = []
    report = pretrain_vision(vlm, processor, looks.frames, rows, steps=3, batch_size=4, log=lines.append)
    after = vlm.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("model.vision_model.", "model.connector.")) for k in moved)
    assert any(k.startswith("model.connector.") for k in moved)
    assert set(after) == set(before)  # the probe head is not part of the model
    assert report["steps"] == 3 and report["grid"] == 2 and 0 < report["validation_rows"] <= len(rows) // 4
    for side in ("before", "after"):
        assert report[side]["regions"] == report["validation_rows"] * 4
        assert 0.0 <= report[side]["colour"] <= 1.0
    assert any("stage 1 done" in line for line in lines)
