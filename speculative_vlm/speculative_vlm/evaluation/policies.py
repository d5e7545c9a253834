"""Policies: what answers each step of an episode with command text.

Every policy returns text, which the runner then carries through the parser, the motion node's
limits and the dynamics, exactly as the robot carries a model's verified text. The scripted
expert reads the ground truth; a model policy reads the robot's real prompt (the instruction, the
scene described from the camera frame or, for a VLM target, the frame itself, and the progress
line) and decodes it with the project's engine under the command grammar: speculatively with a
draft against an in-process verifier, or on the target alone (the outputs are identical, the
speculative run is faster when the draft fits).
"""

from __future__ import annotations

import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

from speculative_vlm.commands.grammar import command_text
from speculative_vlm.commands.prompts import SYSTEM_PROMPT, user_message
from speculative_vlm.evaluation.expert import Expert, ExpertSettings, Situation
from speculative_vlm.go2.motion_rules import MotionLimits
from speculative_vlm.go2.render import with_noise

PERCEPTIONS = ("truth", "scene_text", "image")


@dataclass(frozen=True)
class Observation:
    """What a policy may look at on one step (each policy uses its own part)."""

    instruction: str
    step: int  # 1-based
    progress: str  # the prompt's progress line
    scene_text: str  # the camera frame described in words ("" unless the policy reads scene text)
    frame_jpeg: bytes | None  # the camera frame (only for image perception)
    situation: Situation  # the ground truth (only the expert reads it)

    def prompt(self) -> str:
        """The user message the robot sends for this step (scene text empty for an image target)."""
        return user_message(self.instruction, self.scene_text, self.progress)


@dataclass(frozen=True)
class Reply:
    """A policy's answer for one step, with what it cost to decode."""

    text: str
    seconds: float = 0.0
    tokens: int = 0
    acceptance: float | None = None  # speculative decoding only
    target_passes: int = 0


class Policy(ABC):
    """Answers an observation with command text; ``perception`` says which part it reads."""

    name: str = "policy"
    perception: str = "scene_text"

    @abstractmethod
    def act(self, obs: Observation) -> Reply:
        """The command text for this step."""

    def close(self) -> None:  # noqa: B027 (most policies hold nothing to free)
        """Free what the policy holds (model sessions, threads)."""


class ExpertPolicy(Policy):
    """The scripted expert, answering with the text the command grammar would produce."""

    perception = "truth"

    def __init__(self, limits: MotionLimits | None = None, settings: ExpertSettings | None = None,
                 name: str = "expert") -> None:
        self.expert = Expert(limits, settings)
        self.name = name

    def act(self, obs: Observation) -> Reply:
        return Reply(command_text(self.expert.command(obs.situation)))


class ModelPolicy(Policy):
    """A target model (with an optional draft) decoding the robot's prompt under the command grammar.

    ``target`` and ``draft`` are :class:`~speculative_vlm.decoding.models.ModelAdapter` objects or
    names the model store resolves. ``perception`` is ``scene_text`` for a text-only target or
    ``image`` for a VLM target (the frame goes to the model, the prompt's scene line stays empty);
    a text draft then reads the scene text (``draft_perception`` ``scene_text``, as the drafter node's
    parameter) or no scene (``none``). ``frame_noise`` adds Gaussian pixel noise of that many grey levels
    to every frame an image policy sees (seeded by the step): a camera noisier than training showed.
    """

    def __init__(
        self,
        target,
        draft=None,
        perception: str = "scene_text",
        name: str = "",
        draft_length: int = 4,
        max_new_tokens: int = 64,
        exit_layers=(),
        exit_heads=None,
        system_prompt: str = SYSTEM_PROMPT,
        draft_perception: str = "scene_text",
        frame_noise: float = 0.0,
    ) -> None:
        from speculative_vlm.decoding.inprocess import InProcessVerifier
        from speculative_vlm.decoding.loop import SpeculativeDecoder
        from speculative_vlm.decoding.models import load_model
        from speculative_vlm.decoding.policy import FixedLength
        from speculative_vlm.decoding.target_engine import TargetEngine

        if perception not in ("scene_text", "image"):
            raise ValueError(f"perception must be 'scene_text' or 'image', got {perception!r}")
        if draft_perception not in ("scene_text", "none"):
            raise ValueError(f"draft_perception must be 'scene_text' or 'none', got {draft_perception!r}")
        self.perception = perception
        self.draft_perception = draft_perception
        self.frame_noise = frame_noise
        self.target = load_model(target) if isinstance(target, str) else target
        self.draft = load_model(draft) if isinstance(draft, str) else draft
        self.name = name or (self.target.name + (f"+{self.draft.name}" if self.draft is not None else ""))
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.engine = TargetEngine(self.target, exit_layers=exit_layers, exit_heads=exit_heads)
        self._verifier = None
        self._decoder = None
        if self.draft is not None:
            self._verifier = InProcessVerifier(self.engine)
            self._decoder = SpeculativeDecoder(self.draft, self._verifier, policy=FixedLength(draft_length))

    def request(self, obs: Observation):
        """The session request of a step, as the drafter node builds it."""
        from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest

        settings = GenerationSettings(max_new_tokens=self.max_new_tokens, grammar="command")
        if self.perception == "image":  # pixels alone, also for observations that hold scene text (perception all)
            prompt = user_message(obs.instruction, "", obs.progress)
            frame, scene_text = obs.frame_jpeg, obs.scene_text
            if self.frame_noise > 0 and frame:  # a noisier camera than training ever showed, seeded by the step
                frame = with_noise(frame, self.frame_noise, zlib.crc32(f"{obs.instruction}:{obs.step}".encode()))
                scene_text = ""  # the robot describes the frame it has
            draft_prompt = ""
            if self.draft is not None and not self.draft.is_vlm and self.draft_perception == "scene_text":
                # The draft reads the frame as the robot describes it; the target never sees these words.
                draft_prompt = user_message(obs.instruction, scene_text or _describe(frame), obs.progress)
            return SessionRequest(prompt=prompt, system=self.system_prompt, image=frame, settings=settings,
                                  draft_prompt=draft_prompt)
        return SessionRequest(prompt=obs.prompt(), system=self.system_prompt, settings=settings)

    def act(self, obs: Observation) -> Reply:
        request = self.request(obs)
        if self._decoder is not None:
            result = self._decoder.generate(request)
            return Reply(result.text, result.wall_s, len(result.token_ids), result.acceptance, result.target_passes)
        start = time.perf_counter()
        session = self.engine.open_session(request)
        try:
            tokens = list(self.engine.generate(session))
        finally:
            self.engine.close_session(session)
        return Reply(self.target.decode(tokens), time.perf_counter() - start, len(tokens), None, len(tokens))

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.shutdown()
            self._verifier = None


def _describe(jpeg: bytes | None) -> str:
    """The scene text of a JPEG frame, as the drafter node describes its camera frame."""
    import cv2
    import numpy as np

    from speculative_vlm.commands.scene_text import describe_image

    if not jpeg:
        return ""
    return describe_image(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
