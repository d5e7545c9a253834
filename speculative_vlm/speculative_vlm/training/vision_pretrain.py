"""Stage 1 of ``train-target --vision``: the new vision tower learns what is where in a frame before the
language model is asked to read it.

Why: trained from scratch on the answer tokens alone, the tower gets a gradient only through a language
model that does not yet look at the image tokens (from the answer positions about 0.4-3% of the attention
lands on the 16 image tokens of a prompt of 210), so the signal is too noisy to follow: in the first VLM
run its weights moved no further from their initialisation than a random walk of its steps, and a pilot
trained on the caption task alone (describe the frame, 120 steps) stayed at the loss a blind model gets
(0.55 per token). With a dense label for every image token the same tower learns quickly: on its own, 1,200
steps of 16 frames (3 min here) took the colour of the regions that hold an object from 0% to 78% right on
frames it never saw.

The labels come from the frame itself, as the caption task's do: the scene describer's colour blobs
(``commands.scene_text.detect_blobs``) painted as boxes; each image token's region of the frame (the
processor squashes the frame to a square; Idefics3's pixel shuffle keeps the tokens in row-major order of a
``side`` x ``side`` grid) is labelled with the colour that covers the most of it (at least 1%) and that
blob's shape, or ``none``. A linear head on the connector's output (the vectors the language model reads)
predicts both; it is thrown away afterwards, and only the tower and the connector keep what they learned.
Frames are the training rows' own, rendered with a fresh look each step like stage 2's; a fixed set of
other training rows, rendered with their own looks, measures the accuracy before and after (never the
held-out split).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from speculative_vlm.commands.scene_text import COLOUR_NAMES

COLOURS = ("none", *COLOUR_NAMES)
SHAPES = ("none", "ball", "box", "cone", "object")
MIN_COVER = 0.01  # share of a region an object's box must cover to label it


def region_labels(bgr: np.ndarray, side: int) -> tuple[list[int], list[int]]:
    """(colour index, shape index) of each of the ``side`` x ``side`` regions of ``bgr``, row-major."""
    from speculative_vlm.commands.scene_text import detect_blobs

    height, width = bgr.shape[:2]
    colour_map = np.zeros((height, width), np.int64)
    shape_map = np.zeros((height, width), np.int64)
    for blob in sorted(detect_blobs(bgr), key=lambda b: -b.area_px):  # smaller boxes painted over larger
        x, y, w, h = blob.bbox
        colour_map[y:y + h, x:x + w] = COLOURS.index(blob.colour)
        shape_map[y:y + h, x:x + w] = SHAPES.index(blob.shape)
    colours, shapes = [], []
    for row in range(side):
        for col in range(side):
            window = (slice(row * height // side, (row + 1) * height // side),
                      slice(col * width // side, (col + 1) * width // side))
            c, s = colour_map[window].ravel(), shape_map[window].ravel()
            covered = c[c > 0]
            if len(covered) and len(covered) >= MIN_COVER * len(c):
                colour = int(np.bincount(covered).argmax())
                colours.append(colour)
                shapes.append(int(np.bincount(s[c == colour]).argmax()))
            else:
                colours.append(0)
                shapes.append(0)
    return colours, shapes


def image_features(vlm, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The connector's output for a batch of one-image rows: (rows, image tokens, text hidden)."""
    inner = vlm.model
    out = inner.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"])
    return torch.stack(list(out.pooler_output))


class RegionHead(torch.nn.Module):
    """The throw-away linear probe: colour and shape logits of every image token."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden, len(COLOURS) + len(SHAPES))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.linear(features)
        return logits[..., : len(COLOURS)], logits[..., len(COLOURS):]


def _accuracy(vlm, head: RegionHead, batches: Sequence[tuple[dict, torch.Tensor, torch.Tensor]]) -> dict:
    right = {"colour": 0, "object_colour": 0, "object_shape": 0}
    regions = objects = 0
    with torch.no_grad():
        for pixels, colours, shapes in batches:
            colour_logits, shape_logits = head(image_features(vlm, pixels))
            colour_ok, shape_ok = colour_logits.argmax(-1) == colours, shape_logits.argmax(-1) == shapes
            held = colours > 0
            right["colour"] += int(colour_ok.sum())
            right["object_colour"] += int(colour_ok[held].sum())
            right["object_shape"] += int(shape_ok[held].sum())
            regions, objects = regions + colours.numel(), objects + int(held.sum())
    return {"regions": regions, "object_regions": objects, "colour": round(right["colour"] / max(regions, 1), 3),
            "object_colour": round(right["object_colour"] / max(objects, 1), 3),
            "object_shape": round(right["object_shape"] / max(objects, 1), 3)}


def pretrain_vision(vlm, processor, render: Callable[[Sequence, int], list[bytes]], rows: Sequence, steps: int,
                    batch_size: int = 16, lr: float = 1e-3, seed: int = 0, validation: int = 96,
                    log: Callable[[str], None] = print, log_every: int = 250) -> dict:
    """Train ``vlm``'s vision tower and connector on region labels of frames of ``rows`` for ``steps`` steps.

    ``render(rows, step)`` gives each row's frame as a JPEG, its look seeded by ``step`` (stage 2's
    ``FrameSteps.frames``). The first ``validation`` rows (at most a quarter) of a seeded shuffle are held
    back for the before/after accuracy; the rest are drawn ``batch_size`` at a time. Returns what the card reports.
    """
    import cv2

    from speculative_vlm.training.train_vlm import pixels as frame_pixels

    side = math.isqrt(processor.image_seq_len)
    if side * side != processor.image_seq_len:
        raise ValueError(f"{processor.image_seq_len} image tokens do not make a square grid")
    validation = min(validation, len(rows) // 4)
    order = list(range(len(rows)))
    random.Random(f"vision-pretrain:{seed}").shuffle(order)
    held, pool = [rows[i] for i in order[:validation]], [rows[i] for i in order[validation:]]
    if not pool:
        raise ValueError("no rows left to pretrain the vision tower on after the validation rows")

    def labelled(batch: Sequence, step: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        jpegs = render(batch, step)
        labels = [region_labels(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR), side) for j in jpegs]
        return (frame_pixels(processor, jpegs), torch.tensor([c for c, _ in labels]),
                torch.tensor([s for _, s in labels]))

    checks = [labelled(held[i:i + batch_size], -1 - i) for i in range(0, len(held), batch_size)]
    torch.manual_seed(seed)
    head = RegionHead(vlm.config.text_config.hidden_size)
    parts = [vlm.model.vision_model, vlm.model.connector, head]
    params = [p for part in parts for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    before = _accuracy(vlm, head, checks)
    log(f"[vision] stage 1: tower + connector on region labels, {steps} steps of {batch_size} frames, "
        f"{len(pool)} rows; before: {before}")
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    draw = random.Random(f"vision-batches:{seed}")
    began, losses = time.monotonic(), []
    for part in parts:
        part.train()
    for step in range(1, steps + 1):
        pixels, colours, shapes = labelled(draw.sample(pool, min(batch_size, len(pool))), step)
        colour_logits, shape_logits = head(image_features(vlm, pixels))
        loss = (torch.nn.functional.cross_entropy(colour_logits.reshape(-1, len(COLOURS)), colours.view(-1))
                + torch.nn.functional.cross_entropy(shape_logits.reshape(-1, len(SHAPES)), shapes.view(-1)))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            log(f"[vision] step {step}/{steps}: loss {sum(losses) / len(losses):.3f}, "
                f"{(time.monotonic() - began) / 60:.1f} min")
            losses.clear()
    for part in parts:
        part.eval()
    after = _accuracy(vlm, head, checks)
    minutes = (time.monotonic() - began) / 60
    log(f"[vision] stage 1 done in {minutes:.1f} min; after: {after}")
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "grid": side, "validation_rows": len(held),
            "before": before, "after": after, "minutes": round(minutes, 1)}
