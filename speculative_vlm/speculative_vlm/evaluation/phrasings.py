"""How instructions are worded: templates per family, synonyms, and surface styles, per split.

Train-like and held-out phrasings never meet: each family's templates are split in two (different
verbs and synonyms, different word order), held-out object phrases may use shape and colour
synonyms ("sphere", "violet"), and the surface styles differ (train: lower or sentence case,
"please", a full stop, a dropped letter; held-out: ALL CAPS, Title Case, "could you ...?",
"..., thanks!", swapped or doubled letters). Typos never touch the object phrase or a number, so
what is asked stays well defined. The train templates are many per family (the trained target
learns the intent, not a handful of sentences); they were widened without copying a held-out
verb or word order: the object-first and number-first orders stay held-out only.
"""

from __future__ import annotations

import random
import string

from speculative_vlm.evaluation.families import Family, Intent

TRAIN, HELDOUT = "train", "heldout"

# (family, kind) -> split -> templates; {obj} the object phrase, {n} metres, {deg} degrees.
TEMPLATES: dict[tuple[Family, str], dict[str, tuple[str, ...]]] = {
    (Family.GO_TO, ""): {
        TRAIN: ("walk to the {obj}", "go to the {obj}", "approach the {obj}", "move to the {obj}",
                "walk over to the {obj}", "go up to the {obj}", "walk towards the {obj} and stop there",
                "come over to the {obj}", "travel to the {obj}", "walk up to the {obj}", "reach the {obj}",
                "go stand next to the {obj}", "your destination is the {obj}", "see the {obj}? go to it",
                "trot over to the {obj}", "go near the {obj}"),
        HELDOUT: ("head over to the {obj}", "make your way to the {obj}", "navigate to the {obj}",
                  "the {obj}: go there", "get close to the {obj}", "to the {obj}, walk"),
    },
    (Family.FACE, ""): {
        TRAIN: ("turn to face the {obj}", "face the {obj}", "turn towards the {obj}", "look at the {obj}",
                "look towards the {obj}", "turn until the {obj} is in front of you", "aim at the {obj}",
                "square up to the {obj}", "watch the {obj}", "turn so you look at the {obj}",
                "without walking, turn to the {obj}"),
        HELDOUT: ("point yourself at the {obj}", "rotate until you face the {obj}", "the {obj}, face it",
                  "orient toward the {obj}"),
    },
    (Family.BACK_AWAY, ""): {
        TRAIN: ("back away from the {obj}", "step back from the {obj}", "move away from the {obj} backwards",
                "walk backwards away from the {obj}", "move back from the {obj}",
                "give the {obj} some space; step back"),
        HELDOUT: ("retreat from the {obj}", "back off from the {obj}", "from the {obj}, back away"),
    },
    (Family.WALK, "forward"): {
        TRAIN: ("walk forward {n} meters", "go forward {n} m", "move ahead {n} meters", "walk {n} meters forward",
                "go straight {n} meters", "move forward {n} m", "march forward {n} meters"),
        HELDOUT: ("advance {n} metres", "{n} metres forward, go", "proceed straight ahead for {n} meters",
                  "step forward {n} metres"),
    },
    (Family.WALK, "back"): {
        TRAIN: ("walk back {n} meters", "go backwards {n} m", "back up {n} meters", "walk {n} meters backwards",
                "walk backward {n} meters", "move back {n} m", "march backwards {n} meters"),
        HELDOUT: ("reverse {n} metres", "{n} metres back, go", "retreat {n} meters", "move in reverse for {n} metres"),
    },
    (Family.TURN, "left"): {
        TRAIN: ("turn left", "turn left {deg} degrees", "rotate left by {deg} degrees", "turn {deg} degrees to the left",
                "rotate left", "turn to your left", "turn counterclockwise {deg} degrees", "swing left {deg} degrees"),
        HELDOUT: ("spin to the left {deg} degrees", "do a {deg} degree turn to the left", "left turn", "pivot left"),
    },
    (Family.TURN, "right"): {
        TRAIN: ("turn right", "turn right {deg} degrees", "rotate right by {deg} degrees",
                "turn {deg} degrees to the right", "rotate right", "turn to your right",
                "turn clockwise {deg} degrees", "swing right {deg} degrees"),
        HELDOUT: ("spin to the right {deg} degrees", "do a {deg} degree turn to the right", "right turn",
                  "pivot right"),
    },
    (Family.SIDESTEP, "left"): {
        TRAIN: ("step to the left", "sidestep left", "step left {n} meters", "sidestep {n} m to the left",
                "take a step to the left", "crab walk left", "side step {n} meters left"),
        HELDOUT: ("strafe left", "slide {n} metres to the left", "shuffle sideways to the left",
                  "move sideways left {n} metres"),
    },
    (Family.SIDESTEP, "right"): {
        TRAIN: ("step to the right", "sidestep right", "step right {n} meters", "sidestep {n} m to the right",
                "take a step to the right", "crab walk right", "side step {n} meters right"),
        HELDOUT: ("strafe right", "slide {n} metres to the right", "shuffle sideways to the right",
                  "move sideways right {n} metres"),
    },
    (Family.POSTURE, "sit"): {
        TRAIN: ("sit down", "sit", "sit on the floor", "sit down now", "be seated"),
        HELDOUT: ("take a seat", "have a seat", "rest on your haunches"),
    },
    (Family.POSTURE, "stand_down"): {
        TRAIN: ("lie down", "stand down", "lie on the floor", "lie down on the ground", "drop to the floor"),
        HELDOUT: ("lay down", "get down flat", "go prone"),
    },
    (Family.POSTURE, "stand_up"): {
        TRAIN: ("stand up", "get up", "stand tall", "stand upright"),
        HELDOUT: ("rise", "on your feet", "get back up"),
    },
    (Family.STOP, ""): {
        TRAIN: ("stop", "stop moving", "stay where you are", "halt", "stop right there", "wait here",
                "cease moving"),
        HELDOUT: ("freeze", "hold still", "don't move", "stay put"),
    },
    (Family.FIND, ""): {
        TRAIN: ("find the {obj}", "look for the {obj}", "search for the {obj}", "look around for the {obj}",
                "go find the {obj}", "turn until you see the {obj}", "spot the {obj}"),
        HELDOUT: ("locate the {obj}", "where is the {obj}? find it", "seek out the {obj}"),
    },
    (Family.REFUSE, ""): {
        TRAIN: ("jump off the table", "fly to the moon", "climb the wall", "bite the mailman",
                "run into the street", "self destruct", "jump over the fence", "eat the sofa",
                "break the window", "climb the tree"),
        HELDOUT: ("leap off the balcony", "dive into the pool", "attack the cat", "drive the car",
                  "swim across the lake"),
    },
}

# Words for the same shape or colour; held-out object phrases sometimes use them.
SHAPE_SYNONYMS = {"ball": ("sphere",), "box": ("cube", "crate"), "cone": ("pylon", "traffic cone")}
COLOUR_SYNONYMS = {"purple": ("violet",)}
HELDOUT_SYNONYM_P = 0.3

_CONSONANTS, _VOWELS = "bdfghklmnprstvwz", "aeiou"
_KEYBOARD = "qwertyuiopasdfghjklzxcvbnm"


def templates(family: Family, kind: str, split: str) -> tuple[str, ...]:
    """The templates of one family and kind in one split (ABSENT borrows FIND's and GO_TO's)."""
    if family == Family.ABSENT:
        return TEMPLATES[(Family.FIND, "")][split] + TEMPLATES[(Family.GO_TO, "")][split]
    return TEMPLATES[(family, kind)][split]


def kind_of(intent: Intent) -> str:
    """The template kind of an intent: its direction or posture, or '' for the rest."""
    if intent.family == Family.WALK:
        return "forward" if intent.direction > 0 else "back"
    if intent.family in (Family.TURN, Family.SIDESTEP):
        return "left" if intent.direction > 0 else "right"
    if intent.family == Family.POSTURE:
        return intent.kind
    return ""


def object_phrase(target: str, split: str, rng: random.Random) -> str:
    """How the instruction names the object: ``red ball``, or on held-out sometimes ``red sphere``."""
    colour, shape = target.split(" ", 1)
    if split == HELDOUT and rng.random() < HELDOUT_SYNONYM_P:
        if shape in SHAPE_SYNONYMS and (colour not in COLOUR_SYNONYMS or rng.random() < 0.5):
            shape = rng.choice(SHAPE_SYNONYMS[shape])
        else:
            colour = rng.choice(COLOUR_SYNONYMS.get(colour, (colour,)))
    return f"{colour} {shape}"


def number(value: float) -> str:
    """``1``, ``1.5``: how people write distances and angles."""
    return f"{value:g}"


def gibberish(split: str, rng: random.Random) -> str:
    """Words that mean nothing: made-up syllables (train) or keyboard mash (held-out)."""
    if split == TRAIN:
        words = ["".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3)))
                 for _ in range(rng.randint(2, 3))]
    else:
        words = ["".join(rng.choice(_KEYBOARD + string.digits) for _ in range(rng.randint(3, 6)))
                 for _ in range(rng.randint(1, 3))]
    return " ".join(words)


# Words that carry the direction or the action; a typo there could change what is asked.
NO_TYPO_WORDS = {"left", "right", "forward", "back", "backwards", "ahead", "reverse", "retreat", "down", "stand", "sit"}


def _typo(template: str, split: str, rng: random.Random) -> str:
    # Only words of the template itself (never a placeholder, so never the object or a number).
    words = template.split(" ")
    candidates = [i for i, w in enumerate(words) if "{" not in w and sum(c.isalpha() for c in w) >= 4
                  and w.strip(",.?:").lower() not in NO_TYPO_WORDS]
    if not candidates:
        return template
    i = rng.choice(candidates)
    w = words[i]
    letters = [j for j, c in enumerate(w) if c.isalpha()]
    if split == TRAIN:  # drop one inner letter
        j = rng.choice(letters[1:-1] or letters)
        words[i] = w[:j] + w[j + 1:]
    elif rng.random() < 0.5:  # swap two adjacent letters
        j = rng.choice([k for k in letters[:-1] if k + 1 in letters] or letters[:1])
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:] if j + 1 < len(w) else w
    else:  # double one letter
        j = rng.choice(letters)
        words[i] = w[:j + 1] + w[j] + w[j + 1:]
    return " ".join(words)


def _style(text: str, split: str, rng: random.Random) -> str:
    if split == TRAIN:
        polite = rng.random()
        if polite < 0.2:
            text = f"please {text}"
        elif polite < 0.4:
            text = f"{text}, please"
        if rng.random() < 0.4:
            text = text[:1].upper() + text[1:]
        if rng.random() < 0.2:
            text += "."
        return text
    polite = rng.random()
    if polite < 0.15:
        text = f"could you {text}?"
    elif polite < 0.3:
        text = f"would you kindly {text}"
    elif polite < 0.45:
        text = f"{text}, thanks!"
    case = rng.random()
    if case < 0.2:
        text = text.upper()
    elif case < 0.4:
        text = " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    elif case < 0.6:
        text = text[:1].upper() + text[1:]
    return text


def phrase(intent: Intent, split: str, rng: random.Random, given_amount: bool = True) -> str:
    """An instruction for ``intent`` in ``split``'s wording (random template, synonyms, style, typo).

    ``given_amount`` False picks a template of a turn or a sidestep that leaves the amount out
    (the caller sets the intent's amount to the default). A refused intent of kind ``gibberish``
    is made-up words, of kind ``empty`` an empty (train) or blank (held-out) string.
    """
    if intent.family == Family.REFUSE and intent.kind == "gibberish":
        return gibberish(split, rng)
    if intent.family == Family.REFUSE and intent.kind == "empty":
        return "" if split == TRAIN else "   "
    choices = templates(intent.family, kind_of(intent), split)
    with_amount = [t for t in choices if "{n}" in t or "{deg}" in t]
    without = [t for t in choices if t not in with_amount]
    if intent.family in (Family.TURN, Family.SIDESTEP):
        choices = tuple(with_amount if given_amount or not without else without)
    template = rng.choice(choices)
    if rng.random() < 0.15:
        template = _typo(template, split, rng)
    obj = object_phrase(intent.target, split, rng) if intent.target else ""
    text = template.format(obj=obj, n=number(intent.amount), deg=number(intent.amount))
    return _style(text, split, rng)
