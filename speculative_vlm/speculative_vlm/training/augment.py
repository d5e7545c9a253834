"""More wordings of the training states: each state again with a fresh train-split instruction, restyled.

An episode's instruction is drawn once, so a model fine-tuned on the rollouts alone sees each
wording only with the few states of its episode and learns which sentence goes with which answer
rather than what the words ask. The answer depends on the intent, not on its words, so most
training states are given a fresh wording of their episode's intent
(:func:`reworded`: another train template and train style from
:mod:`speculative_vlm.evaluation.phrasings`), a share of them restyled by surface changes that the
evaluation's held-out styles do not use (held-out: ALL CAPS, Title Case, "could you ...?", "would
you kindly ...", "..., thanks!", swapped or doubled letters):

- scattered capitals: a few letters of one or two words upper-cased (never a whole word of
  three letters or more, never every word);
- capitalised words: some words capitalised (never all of them) or one word shouted in capitals
  (never every word);
- a keyboard slip: one letter of a word replaced by a neighbouring key (the words that carry the
  direction or the action, and the object's colour and shape, are left alone, as the evaluation's
  typos leave them);
- an address or a tail: "robot, ...", "i need you to ...", "... now", "ok, ...";
- spacing: a doubled space or a trailing space.

The answers are the expert's, unchanged: the words changed, not what is asked. Everything is fixed
by a seed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

from speculative_vlm.commands.prompts import COLOURS
from speculative_vlm.evaluation.examples import Example
from speculative_vlm.evaluation.families import DEFAULT_SIDESTEP_M, DEFAULT_TURN_DEG, Family, Intent
from speculative_vlm.evaluation.phrasings import NO_TYPO_WORDS, TRAIN, phrase
from speculative_vlm.go2.scene import SHAPES

# Neighbouring keys on a QWERTY keyboard (letters only).
_NEIGHBOURS = {
    "q": "wa", "w": "qes", "e": "wrd", "r": "etf", "t": "ryg", "y": "tuh", "u": "yij", "i": "uok", "o": "ipl",
    "p": "ol", "a": "qsz", "s": "awdx", "d": "sefc", "f": "drgv", "g": "fthb", "h": "gyjn", "j": "hukm",
    "k": "jil", "l": "ko", "z": "ax", "x": "zsc", "c": "xdv", "v": "cfb", "b": "vgn", "n": "bhm", "m": "nj",
}
# Words a slip never touches: those that carry the direction or the action, and the object's colour and shape
# (as the evaluation's typos leave the object phrase alone).
_KEEP = NO_TYPO_WORDS | set(COLOURS) | set(SHAPES)
_ADDRESSES = ("robot, {}", "i need you to {}", "{} now", "ok, {}", "dog, {}")


def _scatter_capitals(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= 3]
    for i in rng.sample(candidates, min(len(candidates), rng.randint(1, 2))):
        letters = [j for j, c in enumerate(words[i]) if c.isalpha()]
        chosen = set(rng.sample(letters, rng.randint(1, max(1, len(letters) // 2 - 1))))
        words[i] = "".join(c.upper() if j in chosen else c for j, c in enumerate(words[i]))
    return " ".join(words)


def _capitalised_words(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    alpha = [i for i, w in enumerate(words) if any(c.isalpha() for c in w)]
    if len(alpha) < 2:
        return text
    if rng.random() < 0.3:  # one word shouted (a word of three letters or more, never every word)
        long = [i for i in alpha if sum(c.isalpha() for c in words[i]) >= 3]
        if long:
            i = rng.choice(long)
            words[i] = words[i].upper()
        return " ".join(words)
    lower = [i for i in alpha if not words[i][:1].isupper()]
    if len(lower) < 2:  # capitalising any would leave every word capitalised (Title Case is held-out)
        return text
    for i in rng.sample(lower, rng.randint(1, len(lower) - 1)):
        words[i] = words[i][:1].upper() + words[i][1:]
    return " ".join(words)


def _not_held_out_case(text: str) -> str:
    """``text``, its last word's first letter lower-cased when every word starts upper-case (ALL CAPS and
    Title Case are the held-out styles; changes drawn at random may add up to one)."""
    words = text.split(" ")
    alpha = [i for i, w in enumerate(words) if any(c.isalpha() for c in w)]
    if (len(alpha) >= 2 and all(words[i][:1].isupper() for i in alpha)) or text.isupper():
        last = alpha[-1]
        j = next(k for k, c in enumerate(words[last]) if c.isalpha())
        words[last] = words[last][:j] + words[last][j].lower() + words[last][j + 1:]
    return " ".join(words)


def _keyboard_slip(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= 4
                  and w.strip(",.?:!;").lower() not in _KEEP]
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
    changes = rng.sample(("capitals", "words", "slip", "address", "spacing"), rng.randint(1, 3))
    if "address" in changes:
        text = rng.choice(_ADDRESSES).format(text[:1].lower() + text[1:])
    if "slip" in changes:
        text = _keyboard_slip(text, rng)
    if "capitals" in changes:
        text = _scatter_capitals(text, rng)
    if "words" in changes:
        text = _capitalised_words(text, rng)
    text = _not_held_out_case(text)
    if "spacing" in changes:
        if " " in text and rng.random() < 0.5:
            spaces = [k for k, c in enumerate(text) if c == " "]
            k = rng.choice(spaces)
            text = text[:k] + " " + text[k:]
        else:
            text += " "
    return text


def given_amount(intent: Intent, rng: random.Random) -> bool:
    """Whether a wording of ``intent`` states its amount: always, unless the amount is the family's default
    (then "turn left" and "turn left 90 degrees" ask the same, and either is drawn)."""
    default = {Family.TURN: DEFAULT_TURN_DEG, Family.SIDESTEP: DEFAULT_SIDESTEP_M}.get(intent.family)
    return intent.amount != default or rng.random() < 0.5


def reworded(examples: Sequence[Example], intents: Mapping[str, Intent], share: float, restyle_share: float,
             seed: int = 0) -> list[Example]:
    """The examples with a seeded ``share`` of them given a fresh train-split wording of their episode's intent
    (``intents`` by episode id; the answers unchanged), each restyled with probability ``restyle_share``.

    Whether and how an example is reworded is drawn from (seed, episode, step), so the same arguments give
    the same list. Examples whose instruction is blank (refused before any step) keep it.
    """
    out = []
    for example in examples:
        rng = random.Random(f"reword:{seed}:{example.episode}:{example.step}")
        if not example.instruction.strip() or rng.random() >= share:
            out.append(example)
            continue
        intent = intents[example.episode]
        text = phrase(intent, TRAIN, rng, given_amount=given_amount(intent, rng))
        if rng.random() < restyle_share:
            text = restyle(text, rng)
        out.append(replace(example, instruction=text))
    return out
