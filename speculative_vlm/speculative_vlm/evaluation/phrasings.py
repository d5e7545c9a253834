"""How instructions are worded: templates per family, synonyms, and surface styles, per split.

Train-like and held-out phrasings never meet: each family's templates are split in two (different
verbs and synonyms, different word order), held-out object phrases may use shape and colour
synonyms ("sphere", "violet"), and the surface styles differ (train: lower or sentence case,
"please", "can you ...?", "... for me", "hey, ...", a full stop, a dropped letter; held-out:
ALL CAPS, Title Case, "could you ...?", "would you kindly ...", "..., thanks!", swapped or
doubled letters). Typos never touch the object phrase or a number, so what is asked stays well
defined. The train templates are many per family (the trained target learns the intent, not a
handful of sentences); they were widened without copying a held-out verb or a word a held-out
template turns on ("close", "flat", "still", "feet", "sideways", ...): the held-out object-first
orders ("the X: go there", "to the X, walk", "the X, face it") and number-first orders stay
held-out only (training names an object before its verb only in "see the X? go to it" and
"there is a X; walk to it").
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
                "trot over to the {obj}", "go near the {obj}", "get to the {obj}", "run over to the {obj}",
                "jog to the {obj}", "stroll over to the {obj}", "move up to the {obj}", "walk right up to the {obj}",
                "go over to the {obj}", "go all the way to the {obj}", "hurry to the {obj}",
                "walk until you reach the {obj}", "end up next to the {obj}", "get near the {obj}",
                "walk to where the {obj} is", "move next to the {obj}", "go and stand by the {obj}",
                "i want you at the {obj}", "there is a {obj}; walk to it", "walk up and stop at the {obj}",
                "bring yourself to the {obj}", "get yourself over to the {obj}", "pay the {obj} a visit",
                "cross the room to the {obj}", "finish next to the {obj}"),
        HELDOUT: ("head over to the {obj}", "make your way to the {obj}", "navigate to the {obj}",
                  "the {obj}: go there", "get close to the {obj}", "to the {obj}, walk"),
    },
    (Family.FACE, ""): {
        TRAIN: ("turn to face the {obj}", "face the {obj}", "turn towards the {obj}", "look at the {obj}",
                "look towards the {obj}", "turn until the {obj} is in front of you", "aim at the {obj}",
                "square up to the {obj}", "watch the {obj}", "turn so you look at the {obj}",
                "without walking, turn to the {obj}", "look straight at the {obj}", "turn and look at the {obj}",
                "get the {obj} in front of you", "swivel to face the {obj}", "turn in place towards the {obj}",
                "have the {obj} straight ahead of you", "line up with the {obj}", "look in the direction of the {obj}",
                "stand facing the {obj}", "centre the {obj} in your view", "turn your nose to the {obj}",
                "eyes on the {obj}", "stay in place and face the {obj}", "there is a {obj}; look at it",
                "turn around to the {obj}", "keep your spot but look at the {obj}"),
        HELDOUT: ("point yourself at the {obj}", "rotate until you face the {obj}", "the {obj}, face it",
                  "orient toward the {obj}"),
    },
    (Family.BACK_AWAY, ""): {
        TRAIN: ("back away from the {obj}", "step back from the {obj}", "move away from the {obj} backwards",
                "walk backwards away from the {obj}", "move back from the {obj}",
                "give the {obj} some space; step back", "step away from the {obj}", "back up from the {obj}",
                "walk back away from the {obj}", "move backwards, away from the {obj}",
                "put some distance between you and the {obj}", "get away from the {obj} backwards",
                "keep your distance from the {obj}, step back", "there is a {obj}; back away from it",
                "go backwards away from the {obj}", "increase your distance to the {obj} by walking backwards"),
        HELDOUT: ("retreat from the {obj}", "back off from the {obj}", "from the {obj}, back away"),
    },
    (Family.WALK, "forward"): {
        TRAIN: ("walk forward {n} meters", "go forward {n} m", "move ahead {n} meters", "walk {n} meters forward",
                "go straight {n} meters", "move forward {n} m", "march forward {n} meters", "walk ahead {n} meters",
                "go {n} meters forward", "move {n} m ahead", "walk straight for {n} meters", "go forwards {n} m",
                "travel {n} meters forward", "walk {n} m straight ahead", "trot forward {n} m",
                "walk forward for {n} meters", "cover {n} meters going forward", "go ahead {n} m",
                "take {n} meters forward", "move straight on for {n} m"),
        HELDOUT: ("advance {n} metres", "{n} metres forward, go", "proceed straight ahead for {n} meters",
                  "step forward {n} metres"),
    },
    (Family.WALK, "back"): {
        TRAIN: ("walk back {n} meters", "go backwards {n} m", "back up {n} meters", "walk {n} meters backwards",
                "walk backward {n} meters", "move back {n} m", "march backwards {n} meters", "go back {n} meters",
                "move backwards {n} meters", "walk backwards for {n} m", "back up by {n} m", "step back {n} meters",
                "travel {n} meters backwards", "go {n} m backwards", "move {n} meters back",
                "trot backwards {n} m", "back up for {n} meters", "walk back by {n} m",
                "take {n} meters backwards"),
        HELDOUT: ("reverse {n} metres", "{n} metres back, go", "retreat {n} meters", "move in reverse for {n} metres"),
    },
    (Family.TURN, "left"): {
        TRAIN: ("turn left", "turn left {deg} degrees", "rotate left by {deg} degrees", "turn {deg} degrees to the left",
                "rotate left", "turn to your left", "turn counterclockwise {deg} degrees", "swing left {deg} degrees",
                "turn to the left {deg} degrees", "rotate {deg} degrees left", "turn left by {deg} degrees",
                "rotate to the left", "make a left", "turn yourself left", "rotate anticlockwise {deg} degrees",
                "swivel left", "swing to the left", "twist left {deg} degrees", "turn {deg} deg left",
                "turn leftwards", "turn left in place", "rotate left {deg} deg", "turn {deg} degrees left"),
        HELDOUT: ("spin to the left {deg} degrees", "do a {deg} degree turn to the left", "left turn", "pivot left"),
    },
    (Family.TURN, "right"): {
        TRAIN: ("turn right", "turn right {deg} degrees", "rotate right by {deg} degrees",
                "turn {deg} degrees to the right", "rotate right", "turn to your right",
                "turn clockwise {deg} degrees", "swing right {deg} degrees", "turn to the right {deg} degrees",
                "rotate {deg} degrees right", "turn right by {deg} degrees", "rotate to the right", "make a right",
                "turn yourself right", "swivel right", "swing to the right", "twist right {deg} degrees",
                "turn {deg} deg right", "turn rightwards", "turn right in place", "rotate right {deg} deg",
                "turn {deg} degrees right"),
        HELDOUT: ("spin to the right {deg} degrees", "do a {deg} degree turn to the right", "right turn",
                  "pivot right"),
    },
    (Family.SIDESTEP, "left"): {
        TRAIN: ("step to the left", "sidestep left", "step left {n} meters", "sidestep {n} m to the left",
                "take a step to the left", "crab walk left", "side step {n} meters left", "step left",
                "step {n} m to the left", "sidestep to the left {n} meters", "move left {n} meters without turning",
                "crab left {n} m", "walk to your left without turning", "side-step left", "move over to the left",
                "scoot left", "scoot {n} m to the left", "step over to your left", "sidestep {n} meters left"),
        HELDOUT: ("strafe left", "slide {n} metres to the left", "shuffle sideways to the left",
                  "move sideways left {n} metres"),
    },
    (Family.SIDESTEP, "right"): {
        TRAIN: ("step to the right", "sidestep right", "step right {n} meters", "sidestep {n} m to the right",
                "take a step to the right", "crab walk right", "side step {n} meters right", "step right",
                "step {n} m to the right", "sidestep to the right {n} meters", "move right {n} meters without turning",
                "crab right {n} m", "walk to your right without turning", "side-step right",
                "move over to the right", "scoot right", "scoot {n} m to the right", "step over to your right",
                "sidestep {n} meters right"),
        HELDOUT: ("strafe right", "slide {n} metres to the right", "shuffle sideways to the right",
                  "move sideways right {n} metres"),
    },
    (Family.POSTURE, "sit"): {
        TRAIN: ("sit down", "sit", "sit on the floor", "sit down now", "be seated", "get seated", "sit on the ground",
                "sit like a good dog", "go to a sitting position", "lower yourself into a sit", "sit on your bottom",
                "sit back", "plop down and sit", "now sit"),
        HELDOUT: ("take a seat", "have a seat", "rest on your haunches"),
    },
    (Family.POSTURE, "stand_down"): {
        TRAIN: ("lie down", "stand down", "lie on the floor", "lie down on the ground", "drop to the floor",
                "lower yourself to the floor", "lower your body to the ground", "rest on the floor",
                "lie on your belly", "drop down", "go down to the floor", "lie down now"),
        HELDOUT: ("lay down", "get down flat", "go prone"),
    },
    (Family.POSTURE, "stand_up"): {
        TRAIN: ("stand up", "get up", "stand tall", "stand upright", "stand", "stand up now", "stand up straight",
                "come up to standing", "return to standing", "get up off the floor", "stand on all fours",
                "up, stand"),
        HELDOUT: ("rise", "on your feet", "get back up"),
    },
    (Family.STOP, ""): {
        TRAIN: ("stop", "stop moving", "stay where you are", "halt", "stop right there", "wait here",
                "cease moving", "stop now", "stop where you are", "no more moving", "stay here", "stay right here",
                "stop walking", "quit moving", "stay in place", "remain here", "pause", "stop everything",
                "do not go anywhere"),
        HELDOUT: ("freeze", "hold still", "don't move", "stay put"),
    },
    (Family.FIND, ""): {
        TRAIN: ("find the {obj}", "look for the {obj}", "search for the {obj}", "look around for the {obj}",
                "go find the {obj}", "turn until you see the {obj}", "spot the {obj}", "find me the {obj}",
                "search around for the {obj}", "look around until you see the {obj}", "try to find the {obj}",
                "scan for the {obj}", "hunt for the {obj}", "can you see the {obj}? look for it",
                "turn around and find the {obj}", "track down the {obj}", "get the {obj} in sight",
                "look for a {obj}"),
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


# Politeness by split: (cumulative chance, template); one draw picks the first whose chance exceeds it.
_POLITE = {
    TRAIN: ((0.2, "please {}"), (0.4, "{}, please"), (0.46, "can you {}?"), (0.5, "{} for me"), (0.54, "hey, {}")),
    HELDOUT: ((0.15, "could you {}?"), (0.3, "would you kindly {}"), (0.45, "{}, thanks!")),
}


def _polite(text: str, split: str, rng: random.Random) -> str:
    draw = rng.random()
    return next((template.format(text) for edge, template in _POLITE[split] if draw < edge), text)


def _style(text: str, split: str, rng: random.Random) -> str:
    text = _polite(text, split, rng)
    if split == TRAIN:
        if rng.random() < 0.4:
            text = text[:1].upper() + text[1:]
        if rng.random() < 0.2:
            text += "."
        return text
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
