"""Single-step direction correctness: one prompt, one answer, is it headed the right way?

The states are the expert's own: held-out episodes are rolled out by the expert and every step's
observation is kept with the expert's command. A policy answers each observation once (no closed
loop, so one wrong step does not change the next state), and the answer is *direction-correct*
when it has the expert's action and, for a move, goes the expert's way on every axis:

* an axis the expert uses (|vx| or |vy| >= 0.1 m/s, |vyaw| >= 0.2 rad/s) has the same sign and at
  least that size in the answer;
* an axis the expert leaves still stays under that size in the answer, except forward speed while
  the expert turns in place towards an object it is going to (turning and walking is as right);
* speeds and durations are not judged here; the closed loop judges where the robot ends up.

A looser figure, *main-axis* correctness, asks only for the expert's action and, for a move, the
sign of the axis the expert uses most (relative to its dead zone): "turn left" is right with any
positive yaw rate, whatever else the answer does. It is reported beside the strict one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from speculative_vlm.commands.schema import Action, CommandError, LocomotionCommand, parse_command
from speculative_vlm.evaluation.episodes import Episode
from speculative_vlm.evaluation.families import Family
from speculative_vlm.evaluation.policies import ExpertPolicy, Observation, Policy
from speculative_vlm.evaluation.runner import run_episode
from speculative_vlm.evaluation.world import WorldConfig

DEAD_ZONE = {"vx": 0.1, "vy": 0.1, "vyaw": 0.2}


@dataclass(frozen=True)
class State:
    """One step of an expert rollout: the observation and the expert's command for it."""

    episode: Episode
    observation: Observation
    expert: LocomotionCommand


@dataclass(frozen=True)
class Answer:
    """A policy's answer to one state and whether it is direction-correct."""

    state: State
    text: str
    command: LocomotionCommand | None
    correct: bool
    main_axis: bool = False  # the looser figure
    seconds: float = 0.0


def direction_correct(expert: LocomotionCommand, answer: LocomotionCommand | None, family: Family) -> bool:
    """Whether ``answer`` heads the way ``expert`` does (the rule in this module's docstring)."""
    if answer is None or answer.action != expert.action:
        return False
    if expert.action != Action.MOVE:
        return True
    for axis, zone in DEAD_ZONE.items():
        want, got = getattr(expert, axis), getattr(answer, axis)
        if abs(want) >= zone:
            if got * want <= 0 or abs(got) < zone:
                return False
        elif abs(got) >= zone and not (axis == "vx" and family == Family.GO_TO and got > 0 and abs(expert.vyaw) > 0):
            return False
    return True


def main_axis_correct(expert: LocomotionCommand, answer: LocomotionCommand | None) -> bool:
    """Same action and, for a move, the same sign on the axis the expert uses most."""
    if answer is None or answer.action != expert.action:
        return False
    if expert.action != Action.MOVE:
        return True
    axis = max(DEAD_ZONE, key=lambda a: abs(getattr(expert, a)) / DEAD_ZONE[a])
    return getattr(answer, axis) * getattr(expert, axis) > 0


def judged_row(state: State, text: str, prompt: str) -> dict:
    """One single-step row of a trained model's measurement (train-target, train-target --vision): the
    state's episode, family, ``prompt`` and the model's ``text``, judged against the expert."""
    try:
        command = parse_command(text)
    except CommandError:
        command = None
    family = state.episode.intent.family
    return {"episode": state.episode.id, "family": family.value, "prompt": prompt, "text": text,
            "correct": direction_correct(state.expert, command, family),
            "main_axis": main_axis_correct(state.expert, command)}


def expert_states(episodes: Iterable[Episode], config: WorldConfig | None = None, limit: int = 0) -> list[State]:
    """Every step of the expert's rollouts of ``episodes`` (perceived both ways), up to ``limit`` (0: all)."""
    config = config or WorldConfig()
    expert = ExpertPolicy(config.limits)
    states: list[State] = []

    def keep(obs, record) -> None:
        if record.command is not None:
            states.append(State(episode, obs, record.command))

    for episode in episodes:
        if not episode.instruction.strip():
            continue  # refused before any step: there is no prompt to answer
        run_episode(episode, expert, config, perception="all", on_step=keep)
        if limit and len(states) >= limit:
            break
    return states[:limit] if limit else states


def answer_states(policy: Policy, states: Iterable[State], on_answer: Callable[[Answer], None] | None = None
                  ) -> list[Answer]:
    """The policy's answer to each state, judged for direction."""
    answers = []
    for state in states:
        reply = policy.act(state.observation)
        try:
            command = parse_command(reply.text)
        except CommandError:
            command = None
        answers.append(Answer(state, reply.text, command,
                              direction_correct(state.expert, command, state.episode.intent.family),
                              main_axis_correct(state.expert, command), reply.seconds))
        if on_answer is not None:
            on_answer(answers[-1])
    return answers
