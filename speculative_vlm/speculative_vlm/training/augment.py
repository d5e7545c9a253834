"""Restyled copies of training episodes: the same rollout, the instruction written another way.

The train split's phrasings are few (a handful of templates per family, lower or sentence case,
"please", a dropped letter), so a model fine-tuned on them alone learns their exact tokens. A
share of the training episodes is therefore copied with its instruction restyled by surface
changes that the evaluation's held-out styles do not use (see
:mod:`speculative_vlm.evaluation.phrasings`, whose held-out styles are ALL CAPS, Title Case,
"could you ...?", "would you kindly ...", "..., thanks!", swapped or doubled letters):

- scattered capitals: a few letters of one or two words upper-cased (never a whole word of
  three letters or more, never every word);
- a keyboard slip: one letter of a word replaced by a neighbouring key (the words that carry the
  direction or the action are left alone, as the evaluation's typos leave them);
- an address or a tail: "robot, ...", "i need you to ...", "... now", "ok, ...";
- spacing: a doubled space or a trailing space.

Every step of a copied episode gets the same restyled instruction (as a user types it once), and
the answers are the expert's, unchanged: the words changed, not what is asked. Which episodes are
copied and how is fixed by a seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from speculative_vlm.evaluation.examples import Example
from speculative_vlm.evaluation.phrasings import NO_TYPO_WORDS

# Neighbouring keys on a QWERTY keyboard (letters only).
_NEIGHBOURS = {
    "q": "wa", "w": "qes", "e": "wrd", "r": "etf", "t": "ryg", "y": "tuh", "u": "yij", "i": "uok", "o": "ipl",
    "p": "ol", "a": "qsz", "s": "awdx", "d": "sefc", "f": "drgv", "g": "fthb", "h": "gyjn", "j": "hukm",
    "k": "jil", "l": "ko", "z": "ax", "x": "zsc", "c": "xdv", "v": "cfb", "b": "vgn", "n": "bhm", "m": "nj",
}
_ADDRESSES = ("robot, {}", "i need you to {}", "{} now", "ok, {}", "dog, {}")


def _scatter_capitals(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= 3]
    for i in rng.sample(candidates, min(len(candidates), rng.randint(1, 2))):
        letters = [j for j, c in enumerate(words[i]) if c.isalpha()]
        chosen = set(rng.sample(letters, rng.randint(1, max(1, len(letters) // 2 - 1))))
        words[i] = "".join(c.upper() if j in chosen else c for j, c in enumerate(words[i]))
    return " ".join(words)


def _keyboard_slip(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= 4
                  and w.strip(",.?:!").lower() not in NO_TYPO_WORDS]
    if not candidates:
        return text
    i = rng.choice(candidates)
    inner = [j for j, c in enumerate(words[i]) if c.lower() in _NEIGHBOURS][1:-1]
    if not inner:
        return text
    j = rng.choice(inner)
    slip = rng.choice(_NEIGHBOURS[words[i][j].lower()])
    words[i] = words[i][:j] + slip + words[i][j + 1:]
    return " ".join(words)


def restyle(instruction: str, rng: random.Random) -> str:
    """``instruction`` with one to three train-only surface changes (an empty one stays empty)."""
    if not instruction.strip():
        return instruction
    text = instruction
    changes = rng.sample(("capitals", "slip", "address", "spacing"), rng.randint(1, 3))
    if "address" in changes:
        text = rng.choice(_ADDRESSES).format(text[:1].lower() + text[1:])
    if "slip" in changes:
        text = _keyboard_slip(text, rng)
    if "capitals" in changes:
        text = _scatter_capitals(text, rng)
    if "spacing" in changes:
        if " " in text and rng.random() < 0.5:
            spaces = [k for k, c in enumerate(text) if c == " "]
            k = rng.choice(spaces)
            text = text[:k] + " " + text[k:]
        else:
            text += " "
    return text


def restyled_copies(examples: Sequence[Example], share: float, seed: int = 0) -> list[Example]:
    """Copies of every step of a seeded ``share`` of the episodes, each episode's instruction restyled once."""
    episodes = sorted({e.episode for e in examples})
    rng = random.Random(f"restyle:{seed}")
    chosen = set(rng.sample(episodes, round(share * len(episodes)))) if share > 0 else set()
    styles: dict[str, str] = {}
    copies = []
    for example in examples:
        if example.episode not in chosen or not example.instruction.strip():
            continue
        if example.episode not in styles:
            styles[example.episode] = restyle(example.instruction, random.Random(f"restyle:{seed}:{example.episode}"))
        if styles[example.episode] != example.instruction:
            copies.append(replace(example, instruction=styles[example.episode]))
    return copies
