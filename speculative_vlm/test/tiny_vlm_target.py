"""A tiny VLM target built the way train-target --vision builds the real one (training/vlm_model.py).

A random 2-layer llama on SmolLM2's vocabulary stands in for the text target and a 1-layer vision
tower of width 32 for the real one (32 px frames, 8 px patches: 4 image tokens per frame). Right
for the mechanics (vocabulary, prompt, save/load, merge, lossless decoding), meaningless for quality.
"""

from __future__ import annotations

from speculative_vlm.training.vlm_model import VisionSettings, build_vlm
from tiny_models import tiny_causal_lm

TINY_VISION = VisionSettings(image_size=32, patch_size=8, layers=1, hidden=32, heads=2, intermediate=64)
TINY_VISION_ARGS = ["--image-size", "32", "--patch-size", "8", "--vision-layers", "1", "--vision-hidden", "32",
                    "--vision-heads", "2"]


def tiny_vlm_target(seed: int = 0, layers: int = 2):
    """``(vlm, processor, backbone adapter)``: a tiny Idefics3 on a tiny llama text model."""
    backbone = tiny_causal_lm(seed=seed, layers=layers)
    vlm, processor = build_vlm(backbone.model, backbone.tokenizer, TINY_VISION, seed=seed)
    return vlm, processor, backbone
