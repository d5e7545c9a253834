"""The target's training data: the scripted expert's commands for the robot's own prompts, as tokens.

Examples come from :func:`speculative_vlm.evaluation.examples.training_examples`, so from the
*train* split only: expert rollouts in the in-process simulated Go2, plus rollouts in which some of
the expert's moves are replaced by random ones, so the data also holds the states a model's own
mistakes lead to, each labelled with what the expert would do there (DAgger-style recovery).

Each prompt is tokenised exactly as the engine encodes a request
(:meth:`speculative_vlm.decoding.models.ModelAdapter.encode`: the chat template over the system
prompt and the user message with the instruction, the scene text and the progress line, the
assistant turn opened), and its answer is the command text the grammar writes
(:func:`~speculative_vlm.commands.grammar.command_text`) followed by the end-of-turn token the
engine stops on. Rollouts are cached on disk keyed by the recipe, the world's configuration and
the source of the code that makes them (evaluation, commands, go2), so a rerun reuses them and
a change to the expert or the simulator never serves stale ones. The held-out states used to *measure* the result come from
:func:`speculative_vlm.evaluation.single_step.expert_states` on the held-out split, the same
prompts ``speculative-vlm eval`` scores.

The VLM target (``train-target --vision``) learns from the same rollouts: every example also
records the pose the camera frame was taken from, and :func:`frame_examples` pairs it with its
episode, whose scene :mod:`.vlm_frames` renders the frame from (again each epoch, with another
look). Its data keeps steps whose prompt text repeats when the robot stood elsewhere
(``distinct_frames``): the same words, another picture.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from speculative_vlm.commands.prompts import SYSTEM_PROMPT, render_prompt
from speculative_vlm.commands.scene_text import Pose
from speculative_vlm.evaluation.episodes import FAMILIES, Episode, generate_episodes
from speculative_vlm.evaluation.examples import Example, training_examples
from speculative_vlm.evaluation.families import Family
from speculative_vlm.evaluation.phrasings import TRAIN
from speculative_vlm.evaluation.splits import make_splits
from speculative_vlm.evaluation.world import WorldConfig

DEFAULT_CACHE = Path.home() / ".cache" / "speculative_vlm" / "target-data"
_PACKAGE = Path(__file__).resolve().parents[1]
_SOURCES = ("evaluation", "commands", "go2")  # the code that makes the rollouts


# The families dealt to the training rollouts in turn: every family once, and again those whose commands
# carry numbers read off the instruction and the progress line (how far to walk or turn, when to stop).
TRAINING_FAMILIES: tuple[Family, ...] = (*FAMILIES, Family.GO_TO, Family.FACE, Family.WALK, Family.TURN)


@dataclass(frozen=True)
class DataRecipe:
    """Which train-split rollouts make the data (episode indices ``[0, episodes + perturbed_episodes)``)."""

    episodes: int = 2200  # plain expert rollouts
    perturbed_episodes: int = 800  # rollouts with some moves replaced by random ones
    perturb: float = 0.3  # chance that one of the expert's moves is replaced in those
    seed: int = 1  # episode seed (``speculative-vlm eval`` draws its train-like episodes from seed 0)
    split_seed: int = 0  # which colour/shape combinations are held out (as ``eval --split-seed``)
    families: tuple[Family, ...] = TRAINING_FAMILIES  # dealt to the episodes in turn


@dataclass(frozen=True)
class TokenExample:
    """One prompt and the answer the model is trained to give, as token ids."""

    family: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # the command text, then the end-of-turn token


def expert_examples(recipe: DataRecipe, config: WorldConfig | None = None,
                    log: Callable[[str], None] = print, distinct_frames: bool = False) -> list[Example]:
    """The recipe's examples in a fixed order; a prompt already seen with the same answer is kept once
    (with ``distinct_frames``, only when it was also seen from the same pose)."""
    config = config or WorldConfig.from_config()
    plain = training_examples(recipe.episodes, recipe.seed, recipe.split_seed, config, recipe.families)
    perturbed = training_examples(recipe.perturbed_episodes, recipe.seed, recipe.split_seed, config,
                                  recipe.families, perturb=recipe.perturb, start=recipe.episodes)
    seen: set[tuple] = set()
    examples: list[Example] = []
    total = recipe.episodes + recipe.perturbed_episodes
    episodes: set[str] = set()
    began = time.monotonic()
    for source in (plain, perturbed):
        for example in source:
            if example.episode not in episodes:
                episodes.add(example.episode)
                if len(episodes) % 100 == 0:
                    left = (time.monotonic() - began) / len(episodes) * (total - len(episodes))
                    log(f"[data] {len(episodes)}/{total} rollouts, {len(examples)} examples, about "
                        f"{left / 60:.1f} min left")
            key = (example.prompt, example.answer) + ((example.x, example.y, example.yaw) if distinct_frames else ())
            if key not in seen:
                seen.add(key)
                examples.append(example)
    return examples


def cached_examples(recipe: DataRecipe, config: WorldConfig, cache_dir: Path | None,
                    log: Callable[[str], None] = print, distinct_frames: bool = False) -> list[Example]:
    """:func:`expert_examples`, read from ``cache_dir`` when an identical run wrote them (None: no cache)."""
    if cache_dir is None:
        return expert_examples(recipe, config, log, distinct_frames)
    digest = hashlib.sha256(json.dumps([asdict(recipe), repr(config)] + (["frames"] if distinct_frames else []))
                            .encode())
    for source in sorted(f for package in _SOURCES for f in (_PACKAGE / package).rglob("*.py")):
        digest.update(source.read_bytes())
    path = Path(cache_dir) / f"examples-{digest.hexdigest()[:16]}.json"
    if path.exists():
        log(f"[data] rollouts reused from {path}")
        return [Example(**row) for row in json.loads(path.read_text())]
    examples = expert_examples(recipe, config, log, distinct_frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps([asdict(e) for e in examples]))
    tmp.replace(path)
    return examples


@dataclass(frozen=True)
class FrameExample:
    """A step of a rollout with what its frame is rendered from: the episode (scene, named object) and pose."""

    example: Example
    episode: Episode

    @property
    def pose(self) -> Pose:
        return Pose(self.example.x, self.example.y, self.example.yaw)


def recipe_episodes(recipe: DataRecipe) -> dict[str, Episode]:
    """The recipe's train-split episodes by id (as :func:`expert_examples` rolled them out)."""
    split = make_splits(recipe.split_seed)[TRAIN]
    return {e.id: e for e in generate_episodes(split, recipe.episodes + recipe.perturbed_episodes, recipe.seed,
                                               recipe.families)}


def frame_examples(recipe: DataRecipe, config: WorldConfig, cache_dir: Path | None,
                   log: Callable[[str], None] = print) -> list[FrameExample]:
    """The recipe's examples with distinct frames, each with its episode (train split only)."""
    examples = cached_examples(recipe, config, cache_dir, log, distinct_frames=True)
    episodes = recipe_episodes(recipe)
    return [FrameExample(e, episodes[e.episode]) for e in examples]


def stop_token_id(tokenizer, model_config) -> int:
    """The end-of-turn token the engine stops on (the model's first EOS, else the tokenizer's)."""
    eos = getattr(model_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos if eos is not None else tokenizer.eos_token_id)


def prompt_ids(tokenizer, instruction: str, scene_text: str, progress: str,
               system_prompt: str = SYSTEM_PROMPT) -> list[int]:
    """The prompt's token ids as the engine encodes the robot's request."""
    text = render_prompt(tokenizer, instruction, scene_text, system_prompt, progress)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize(examples: Sequence[Example], tokenizer, stop_id: int,
             system_prompt: str = SYSTEM_PROMPT) -> list[TokenExample]:
    """Token ids of each example's prompt and answer (see the module docstring)."""
    return [
        TokenExample(e.family, tuple(prompt_ids(tokenizer, e.instruction, e.scene_text, e.progress, system_prompt)),
                     (*tokenizer(e.answer, add_special_tokens=False)["input_ids"], stop_id))
        for e in examples
    ]


def describe(examples: Sequence[Example], tokens: Sequence[TokenExample]) -> dict:
    """What the data holds, for the log and the card."""
    actions = Counter(e.answer.split('"')[3] for e in examples)  # {"action":"<here>",...}
    return {
        "examples": len(examples),
        "episodes": len({e.episode for e in examples}),
        "families": dict(sorted(Counter(e.family for e in examples).items())),
        "actions": dict(sorted(actions.items())),
        "prompt_tokens_mean": round(sum(len(t.prompt_ids) for t in tokens) / max(len(tokens), 1), 1),
        "answer_tokens_mean": round(sum(len(t.answer_ids) for t in tokens) / max(len(tokens), 1), 1),
        "answer_tokens": sum(len(t.answer_ids) for t in tokens),
    }
