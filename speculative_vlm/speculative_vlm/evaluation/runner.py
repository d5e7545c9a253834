"""Running episodes: each step through the robot's real command path, recorded for the report.

A step is: the camera frame as the camera node publishes it, perceived as the policy perceives it
(scene text from :func:`~speculative_vlm.commands.scene_text.describe_image`, or the JPEG for a VLM
target), the robot's prompt with its progress line, the policy's text, the parser
(:func:`~speculative_vlm.commands.schema.parse_command`, which refuses anything but one valid
command), then the motion node's limits and the simulated Go2's dynamics (:mod:`.world`). As in
the drafter node, ``done`` ends the episode, text that is not a command ends it with the robot
stopped, an empty instruction is refused before any step, and the step limit ends it otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from speculative_vlm.commands.scene_text import Pose, describe_image
from speculative_vlm.commands.schema import Action, CommandError, LocomotionCommand, parse_command
from speculative_vlm.evaluation.episodes import Episode
from speculative_vlm.evaluation.expert import Situation
from speculative_vlm.evaluation.policies import Observation, Policy
from speculative_vlm.evaluation.world import SimWorld, WorldConfig
from speculative_vlm.go2.sim_model import Mode

ENDINGS = ("done", "step_limit", "refused", "invalid", "failed")  # failed: a graph goal aborted otherwise


@dataclass(frozen=True)
class StepRecord:
    """One step: where the robot was, what it was told and saw, what the policy said and what ran."""

    step: int
    pose: Pose  # before the command
    mode: Mode
    scene_text: str
    progress: str
    text: str  # the policy's text
    command: LocomotionCommand | None  # None when the text was not a command
    executed: LocomotionCommand | None  # what the motion node ran (clamped) (None for done or invalid text)
    pose_after: Pose
    mode_after: Mode
    seconds: float = 0.0
    tokens: int = 0
    acceptance: float | None = None


@dataclass
class EpisodeResult:
    """How an episode went: its steps, its ending, the trajectory, and the verdict of its rule."""

    episode: Episode
    policy: str
    steps: list[StepRecord] = field(default_factory=list)
    ended: str = "step_limit"  # one of ENDINGS
    path: list[tuple[float, float, float]] = field(default_factory=list)
    final: Pose = Pose()
    final_mode: Mode = Mode.BALANCE_STAND
    forward: float = 0.0  # odometry in the start frame at the end, m
    left: float = 0.0
    turned: float = 0.0  # rad, unwrapped
    max_offset: float = 0.0  # farthest from the start at any time, m
    success: bool = False
    why: str = ""

    @property
    def actions(self) -> list[str]:
        return [s.command.action.value for s in self.steps if s.command is not None]


def _situation(episode: Episode, world: SimWorld, last_action: str) -> Situation:
    p = world.progress
    return Situation(episode.intent, episode.scene, world.pose(), p.forward, p.left, p.turned, last_action)


def observe(episode: Episode, world: SimWorld, step: int, last_action: str, perception: str) -> Observation:
    """The observation of a step; ``perception`` ``all`` fills both the scene text and the JPEG."""
    scene_text, jpeg = "", None
    if perception in ("scene_text", "image", "all"):
        import cv2

        frame = world.frame_bgr()
        if perception in ("scene_text", "all"):
            scene_text = describe_image(frame)
        if perception in ("image", "all"):
            ok, buf = cv2.imencode(".jpg", frame)  # as the drafter node encodes the camera frame
            jpeg = buf.tobytes() if ok else None
    progress = world.progress.text(last_action) if world.config.progress_line else ""
    return Observation(episode.instruction, step, progress, scene_text, jpeg, _situation(episode, world, last_action))


def run_episode(
    episode: Episode,
    policy: Policy,
    config: WorldConfig | None = None,
    perception: str | None = None,
    execute: Callable[[Observation, LocomotionCommand], LocomotionCommand] | None = None,
    on_step: Callable[[Observation, StepRecord], None] | None = None,
) -> EpisodeResult:
    """Run one episode; ``perception`` overrides the policy's (e.g. ``all`` to record prompts).

    ``execute`` may replace the command that is executed (training rollouts perturb the expert's
    path this way; the record keeps the policy's own text). ``on_step`` sees every step.
    """
    from speculative_vlm.evaluation.success import judge

    world = SimWorld(episode.scene, episode.start_mode, config)
    result = EpisodeResult(episode, policy.name)
    if not episode.instruction.strip():
        result.ended = "refused"  # the drafter's goal callback refuses an empty instruction
    else:
        last = ""
        for step in range(1, episode.max_steps + 1):
            pose, mode = world.pose(), world.mode()
            obs = observe(episode, world, step, last, perception or policy.perception)
            reply = policy.act(obs)
            try:
                command = parse_command(reply.text)
            except CommandError:
                command = None
            executed, run = None, command
            if command is not None and command.action != Action.DONE:
                run = execute(obs, command) if execute else command
                executed = world.execute(run)
            record = StepRecord(step, pose, mode, obs.scene_text, obs.progress, reply.text, command, executed,
                                world.pose(), world.mode(), reply.seconds, reply.tokens, reply.acceptance)
            result.steps.append(record)
            if on_step is not None:
                on_step(obs, record)
            if command is None:
                world.execute(LocomotionCommand(Action.STOP))  # the drafter stops the robot on a bad step
                result.ended = "invalid"
                break
            if command.action == Action.DONE:
                result.ended = "done"
                break
            last = run.action.value  # the prompt's "last command" is what the robot last did
    result.path = list(world.path)
    result.final, result.final_mode = world.pose(), world.mode()
    p = world.progress
    result.forward, result.left, result.turned, result.max_offset = p.forward, p.left, p.turned, world.max_offset
    result.success, result.why = judge(result)
    return result


def run_episodes(
    episodes: Iterable[Episode],
    policy: Policy,
    config: WorldConfig | None = None,
    on_result: Callable[[EpisodeResult], None] | None = None,
) -> list[EpisodeResult]:
    """Run episodes one after another with one policy."""
    results = []
    for episode in episodes:
        results.append(run_episode(episode, policy, config))
        if on_result is not None:
            on_result(results[-1])
    return results


def bearing_deg(result: EpisodeResult, target: str) -> float | None:
    """Bearing of the named object from the final pose, degrees (+ left); None when not in the scene."""
    for obj in result.episode.scene.objects:
        if obj.name.removeprefix("the ") == target:
            dx, dy = obj.x - result.final.x, obj.y - result.final.y
            return math.degrees(math.atan2(dy, dx) - result.final.yaw + math.pi) % 360 - 180
    return None
