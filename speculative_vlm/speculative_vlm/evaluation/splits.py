"""Train-like and held-out splits: which objects, layouts and wordings each may use.

The held-out split tests generalisation: its instructions name colour/shape combinations that no
training scene ever contains, its scenes follow layouts no training scene follows, and its
wording (templates, synonyms, styles, typos: :mod:`.phrasings`) is never used in training. Which
combinations are held out is drawn from a seed, so a split is reproducible and can be varied.
Training code draws its examples from :func:`make_splits`'s ``"train"`` split only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from speculative_vlm.commands.prompts import COLOURS
from speculative_vlm.evaluation.phrasings import HELDOUT, TRAIN
from speculative_vlm.go2.scene import SHAPES

TRAIN_LAYOUTS = ("scatter", "row", "cluster")
HELDOUT_LAYOUTS = ("arc", "ring", "corridor")
HELDOUT_COMBOS = 5  # one per colour for five of the six colours, each shape at most twice


@dataclass(frozen=True)
class Split:
    """What one split's episodes may contain."""

    name: str  # "train" or "heldout"; also selects the wording (phrasings.TEMPLATES)
    combos: tuple[str, ...]  # objects that may stand in its scenes ("red ball", ...)
    target_combos: tuple[str, ...]  # objects its instructions may name
    layouts: tuple[str, ...]  # scene layouts (scenes.LAYOUTS)


def all_combos() -> tuple[str, ...]:
    """Every colour/shape combination a scene can hold (the shapes the simulated Go2 can render)."""
    return tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


def heldout_combos(seed: int = 0) -> tuple[str, ...]:
    """The combinations no training scene contains: each colour and shape stays in training too."""
    rng = random.Random(f"heldout-combos:{seed}")
    combos = list(all_combos())
    rng.shuffle(combos)
    chosen: list[str] = []
    for combo in combos:
        colour, shape = combo.split(" ")
        if all(c.split(" ")[0] != colour for c in chosen) and sum(c.split(" ")[1] == shape for c in chosen) < 2:
            chosen.append(combo)
        if len(chosen) == HELDOUT_COMBOS:
            break
    return tuple(sorted(chosen))


def make_splits(seed: int = 0) -> dict[str, Split]:
    """The train and held-out splits for a split seed."""
    held = heldout_combos(seed)
    train = tuple(c for c in all_combos() if c not in held)
    return {
        TRAIN: Split(TRAIN, combos=train, target_combos=train, layouts=TRAIN_LAYOUTS),
        HELDOUT: Split(HELDOUT, combos=all_combos(), target_combos=held, layouts=HELDOUT_LAYOUTS),
    }
