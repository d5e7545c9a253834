"""Prompt templates for robot commands: the system prompt, the user message, and sampled tasks.

One builder serves the robot's drafter node and the draft model's training data, so the
draft is trained on exactly the prompts it will see on the robot. The user message is the
instruction plus the scene text of :mod:`speculative_vlm.commands.scene_text` (a text-only
target cannot see the camera frame, so it reads what coloured objects are where).

:func:`sample_task` draws a random scene and instruction from the templates below; it is
what ``speculative-vlm train-draft`` feeds the target to collect its answers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from speculative_vlm.commands.scene_text import NamedPoint, Pose, describe_objects

SYSTEM_PROMPT = (
    "You control a Unitree Go2 robot dog. Reply with one JSON object and nothing else: "
    '{"action": ..., "vx": ..., "vy": ..., "vyaw": ..., "duration": ...}. '
    "action is one of move, stop, stand_up, stand_down, sit, done. "
    "vx is the forward speed in m/s (-0.5 to 1.0, negative walks backwards), "
    "vy the sideways speed in m/s (-0.5 to 0.5, positive is left), "
    "vyaw the turn rate in rad/s (-1.5 to 1.5, positive turns left), "
    "duration how long to do it in seconds (0 to 5). "
    "Use done when the instruction is already fulfilled."
)

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("ball", "box", "cone", "chair", "bucket", "backpack")

# {obj} is an object in the scene, {absent} one that is not; the rest need no object.
_OBJECT_INSTRUCTIONS = (
    "walk to the {obj}",
    "go to the {obj}",
    "approach the {obj}",
    "move towards the {obj}",
    "turn to face the {obj}",
    "turn towards the {obj}",
    "back away from the {obj}",
    "walk to the {obj} and stop there",
    "go around the {obj}",
    "sidestep so the {obj} is straight ahead",
    "follow the {obj}",
    "walk slowly to the {obj}",
    "run to the {obj}",
    "stop in front of the {obj}",
)
_ABSENT_INSTRUCTIONS = (
    "walk to the {absent}",
    "find the {absent}",
    "look for the {absent}",
)
_PLAIN_INSTRUCTIONS = (
    "stop",
    "stop moving",
    "sit down",
    "sit",
    "stand up",
    "lie down",
    "stand down",
    "walk forward",
    "walk forward {metres} meters",
    "walk backwards",
    "walk back {metres} meters",
    "turn left",
    "turn right",
    "turn around",
    "step to the left",
    "step to the right",
    "stay where you are",
    "spin in place",
    "you are done, finish",
)


@dataclass(frozen=True)
class Task:
    """One robot-command prompt: what the user asked and what the robot sees."""

    instruction: str
    scene_text: str
    objects: tuple[NamedPoint, ...] = field(default=())
    pose: Pose = Pose()


def user_message(instruction: str, scene_text: str, progress: str = "") -> str:
    """The user turn: the instruction first, then what the robot currently sees, then (when given)
    what it has done since the instruction arrived (:meth:`Progress.text`)."""
    message = f"Instruction: {instruction.strip()}\nScene: {scene_text.strip()}"
    return f"{message}\nProgress: {progress.strip()}" if progress.strip() else message


class Progress:
    """Odometry since the instruction arrived, told to the model on every step.

    One frame is all a stateless model sees, and an instruction such as "walk forward 2 meters",
    "turn left 90 degrees" or "sit down" is fulfilled only relative to where the robot started: the
    same camera view comes back after a sit or a walk through an empty room. So each step's prompt
    also says how far the robot has moved in the frame it had when the instruction arrived, how far
    it has turned (unwrapped: a full turn is 360 degrees, not 0) and what its last command was.
    """

    def __init__(self, start: Pose) -> None:
        self.start = start
        self.forward = 0.0  # m, along the start heading
        self.left = 0.0  # m, to the left of the start heading
        self.turned = 0.0  # rad, + left, unwrapped
        self._yaw = start.yaw

    def update(self, pose: Pose) -> None:
        """Record the robot's current pose (call often enough that it turns < 180 degrees in between)."""
        dx, dy = pose.x - self.start.x, pose.y - self.start.y
        c, s = math.cos(self.start.yaw), math.sin(self.start.yaw)
        self.forward, self.left = c * dx + s * dy, -s * dx + c * dy
        self.turned += math.atan2(math.sin(pose.yaw - self._yaw), math.cos(pose.yaw - self._yaw))
        self._yaw = pose.yaw

    def text(self, last_action: str = "") -> str:
        """``moved 1.2 m forward and 0.3 m to the right, turned 45 degrees to the left; last command: move``."""
        fwd, left, deg = round(self.forward, 1) + 0.0, round(self.left, 1) + 0.0, round(math.degrees(self.turned))
        moved = (f"moved {abs(fwd):.1f} m {'back' if fwd < 0 else 'forward'} and "
                 f"{abs(left):.1f} m to the {'right' if left < 0 else 'left'}")
        turned = f"turned {abs(deg)} degrees" + (f" to the {'left' if deg > 0 else 'right'}" if deg else "")
        return f"{moved}, {turned}; last command: {last_action or 'none'}"


def build_messages(
    instruction: str, scene_text: str, system_prompt: str = SYSTEM_PROMPT, progress: str = ""
) -> list[dict]:
    """Chat messages (system + user) ready for ``tokenizer.apply_chat_template``."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": user_message(instruction, scene_text, progress)},
    ]


def render_prompt(
    tokenizer, instruction: str, scene_text: str, system_prompt: str = SYSTEM_PROMPT, progress: str = ""
) -> str:
    """The prompt text with the assistant turn opened, as the target and the draft both see it."""
    return tokenizer.apply_chat_template(
        build_messages(instruction, scene_text, system_prompt, progress), tokenize=False, add_generation_prompt=True
    )


def sample_scene(rng: random.Random, max_objects: int = 4) -> tuple[tuple[NamedPoint, ...], Pose]:
    """A random scene: 0..max_objects distinct coloured objects around a robot at a random pose."""
    count = rng.choices(range(max_objects + 1), weights=[1] + [3] * max_objects)[0]
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    pose = Pose(x=round(rng.uniform(-2, 2), 1), y=round(rng.uniform(-2, 2), 1), yaw=round(rng.uniform(-3.1, 3.1), 2))
    objects = []
    for colour, shape in kinds:
        # Mostly in front of the robot (it usually looks at what it is told about),
        # sometimes beside or behind it; distances like a room or a yard.
        distance = rng.choice([rng.uniform(0.3, 1.0), rng.uniform(1.0, 6.0), rng.uniform(1.0, 6.0)])
        bearing = rng.gauss(0.0, 0.8) if rng.random() < 0.8 else rng.uniform(-3.14, 3.14)
        wx = pose.x + distance * math.cos(pose.yaw + bearing)
        wy = pose.y + distance * math.sin(pose.yaw + bearing)
        objects.append(NamedPoint(name=f"{colour} {shape}", x=round(wx, 2), y=round(wy, 2)))
    return tuple(objects), pose


def sample_instruction(rng: random.Random, objects: tuple[NamedPoint, ...]) -> str:
    """An instruction that mostly refers to an object in view, sometimes to none or a missing one."""
    present = {o.name for o in objects}
    roll = rng.random()
    if objects and roll < 0.65:
        return rng.choice(_OBJECT_INSTRUCTIONS).format(obj=rng.choice(objects).name)
    if roll < 0.75:
        absent = rng.choice([f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present])
        return rng.choice(_ABSENT_INSTRUCTIONS).format(absent=absent)
    return rng.choice(_PLAIN_INSTRUCTIONS).format(metres=rng.choice([0.5, 1, 1.5, 2, 3]))


def sample_task(rng: random.Random) -> Task:
    """A random robot-command prompt from the templates, its scene described as the robot would."""
    objects, pose = sample_scene(rng)
    instruction = sample_instruction(rng, objects)
    return Task(instruction=instruction, scene_text=describe_objects(objects, pose), objects=objects, pose=pose)
