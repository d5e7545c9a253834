"""Training examples from the expert: the robot's prompts on the train split, labelled with its commands.

This is what training code uses (``speculative-vlm train-target``): each step of an expert rollout
of a *train-split* episode gives one example, the user message exactly as the robot builds it
(instruction, scene text described from the camera frame, progress line, whatever the config says:
the drafter's ``progress_line`` must be on for a target trained on them) and the command text the
expert gives for it. Held-out episodes are never used, so the evaluation's held-out results stay
a test of generalisation. With ``perturb`` > 0 some of the expert's moves are replaced by random
ones before they run, so the rollouts also visit states off the expert's path; every example is
still labelled with what the expert would do there (as in DAgger).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from speculative_vlm.commands.prompts import SYSTEM_PROMPT, build_messages, user_message
from speculative_vlm.commands.schema import Action, LocomotionCommand
from speculative_vlm.evaluation.episodes import FAMILIES, generate_episodes
from speculative_vlm.evaluation.families import Family
from speculative_vlm.evaluation.phrasings import TRAIN
from speculative_vlm.evaluation.policies import ExpertPolicy, Observation
from speculative_vlm.evaluation.runner import run_episode
from speculative_vlm.evaluation.splits import make_splits
from speculative_vlm.evaluation.world import WorldConfig


@dataclass(frozen=True)
class Example:
    """One prompt of the robot and the expert's command text for it."""

    episode: str
    family: str
    step: int
    instruction: str
    scene_text: str
    progress: str
    answer: str  # the expert's command, as the command grammar writes it
    # Where the robot stood when the camera frame was taken: the frame can be rendered again from it
    # and the episode's scene (the VLM target's training renders it with varied looks).
    x: float = 0.0
    y: float = 0.0
    yaw: float = 0.0

    @property
    def prompt(self) -> str:
        """The user message (what the robot sends as the user turn)."""
        return user_message(self.instruction, self.scene_text, self.progress)

    def messages(self, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
        """System and user turns for ``tokenizer.apply_chat_template``; the assistant turn is :attr:`answer`."""
        return build_messages(self.instruction, self.scene_text, system_prompt, self.progress)


def _random_move(rng: random.Random, config: WorldConfig) -> LocomotionCommand:
    lim = config.limits
    return LocomotionCommand(Action.MOVE, round(rng.uniform(lim.min_vx, lim.max_vx), 1),
                             round(rng.uniform(-lim.max_vy, lim.max_vy), 1) if rng.random() < 0.3 else 0.0,
                             round(rng.uniform(-lim.max_vyaw, lim.max_vyaw), 1), round(rng.uniform(0.5, 1.5), 1))


def training_examples(
    episodes: int,
    seed: int = 0,
    split_seed: int = 0,
    config: WorldConfig | None = None,
    families: Sequence[Family] = FAMILIES,
    perturb: float = 0.0,
    start: int = 0,
) -> Iterator[Example]:
    """Examples from ``episodes`` expert rollouts of the train split (episode indices from ``start``).

    ``perturb`` is the chance that one of the expert's moves is replaced by a random move before it
    runs (posture, stop and done commands are never replaced, so the progress line's "last
    command" stays meaningful). Deterministic for the same arguments.
    """
    # Always with the progress line: without it "walk 2 meters" or "sit" cannot be learnt at all.
    config = replace(config or WorldConfig.from_config(), progress_line=True)
    split = make_splits(split_seed)[TRAIN]
    expert = ExpertPolicy(config.limits)
    rng = random.Random(f"perturb:{seed}:{start}")
    collected: list[Example] = []

    def execute(obs: Observation, command: LocomotionCommand) -> LocomotionCommand:
        if command.action == Action.MOVE and rng.random() < perturb:
            return _random_move(rng, config)
        return command

    def keep(obs: Observation, record) -> None:
        collected.append(Example(episode.id, episode.intent.family.value, obs.step, obs.instruction, obs.scene_text,
                                 obs.progress, record.text, record.pose.x, record.pose.y, record.pose.yaw))

    for episode in generate_episodes(split, episodes, seed, families, start):
        run_episode(episode, expert, config, perception="scene_text", execute=execute if perturb else None,
                    on_step=keep)
        yield from collected
        collected.clear()
