"""The benchmark's prompts: camera frames of the simulated Go2's scene, described, plus instructions.

Every method sees the same prompts. Each prompt comes from a real rendered frame of the
packaged scene at a robot pose (``go2.render``), turned into scene text by the same
describer the robot's drafter uses (``commands.scene_text.describe_image``), and an
instruction drawn from the training templates (``commands.prompts``) about what is in view.
With ``progress`` on (the sim config's drafter sends it, and the trained target reads it), the
user turn also carries the progress line the robot sends with an instruction's first command.
For a VLM target (the drafter's ``perception: image``) each prompt also carries its frame as JPEG:
the target sees the pixels, the text draft the scene text. Deterministic for a seed.
"""

from __future__ import annotations

import base64
import math
import random
from dataclasses import dataclass

import numpy as np

from speculative_vlm.commands.prompts import SYSTEM_PROMPT, Progress, sample_instruction, user_message
from speculative_vlm.commands.scene_text import NamedPoint, Pose
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.go2.render import CameraModel, render_bgr
from speculative_vlm.go2.scene import load_scene

CAMERA = CameraModel(width=320, height=240)


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark command: the frame's pose, the scene text read from it, and the instruction."""

    index: int
    pose: tuple[float, float, float]  # x, y, yaw of the robot when the frame was taken
    instruction: str
    scene_text: str
    progress: str = ""  # the progress line, when the robot sends one
    jpeg: bytes = b""  # the frame, for a VLM target (perception image); empty: the target reads scene_text

    @property
    def user(self) -> str:
        return user_message(self.instruction, self.scene_text, self.progress)

    def request(self, grammar: bool = True, max_new_tokens: int = 64) -> SessionRequest:
        """The robot's request, as the drafter node builds it: with a frame, the target sees the JPEG (the scene
        line empty) and the text draft reads the scene text (``draft_perception`` scene_text)."""
        settings = GenerationSettings(max_new_tokens=max_new_tokens, grammar="command" if grammar else "")
        if self.jpeg:
            return SessionRequest(prompt=user_message(self.instruction, "", self.progress), system=SYSTEM_PROMPT,
                                  image=self.jpeg, settings=settings, draft_prompt=self.user)
        return SessionRequest(prompt=self.user, system=SYSTEM_PROMPT, settings=settings)

    def to_json(self) -> dict:
        return {"index": self.index, "pose": list(self.pose), "instruction": self.instruction,
                "scene_text": self.scene_text, "progress": self.progress,
                "jpeg": base64.b64encode(self.jpeg).decode()}

    @staticmethod
    def from_json(data: dict) -> BenchPrompt:
        return BenchPrompt(data["index"], tuple(data["pose"]), data["instruction"], data["scene_text"],
                           data.get("progress", ""), base64.b64decode(data.get("jpeg", "")))


def build_prompts(count: int, seed: int = 7, progress: bool = False,
                  image: bool = False) -> tuple[list[BenchPrompt], list[np.ndarray]]:
    """``count`` prompts and their BGR frames: poses spread over the room, looking roughly at the objects;
    with ``progress``, each carries the progress line of an instruction's first command; with ``image``, the
    frame as the camera node's JPEG (for a VLM target)."""
    import cv2

    from speculative_vlm.commands.scene_text import describe_image

    scene = load_scene(None)
    rng = random.Random(seed)
    # The instruction templates name objects without the article the scene file uses.
    objects = tuple(NamedPoint(o.name.removeprefix("the "), o.x, o.y) for o in scene.objects)
    prompts, frames = [], []
    for i in range(count):
        x, y = rng.uniform(-1.5, 2.5), rng.uniform(-2.5, 2.5)
        target = rng.choice(scene.objects)
        # Mostly facing an object (the robot usually looks where it is told), sometimes away.
        yaw = math.atan2(target.y - y, target.x - x) + rng.gauss(0.0, 0.5 if rng.random() < 0.8 else 2.0)
        frame = render_bgr(scene, x, y, yaw, CAMERA)
        jpeg = cv2.imencode(".jpg", frame)[1].tobytes() if image else b""
        prompts.append(BenchPrompt(i, (round(x, 2), round(y, 2), round(yaw, 2)), sample_instruction(rng, objects),
                                   describe_image(frame), Progress(Pose(x, y, yaw)).text() if progress else "",
                                   jpeg))
        frames.append(frame)
    return prompts, frames


def contact_sheet(frames: list[np.ndarray], columns: int = 6, width: int = 160) -> np.ndarray:
    """The frames as one BGR image, so the report shows what the prompts were made from."""
    import cv2

    thumbs = [cv2.resize(f, (width, width * f.shape[0] // f.shape[1])) for f in frames]
    if not thumbs:
        return np.zeros((1, 1, 3), np.uint8)
    h, w = thumbs[0].shape[:2]
    rows = math.ceil(len(thumbs) / columns)
    sheet = np.full((rows * h, min(columns, len(thumbs)) * w, 3), 255, np.uint8)
    for i, t in enumerate(thumbs):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
    return sheet
