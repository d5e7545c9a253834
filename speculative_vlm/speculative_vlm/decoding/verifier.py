"""The contract between the speculative loop and whatever verifies its drafts.

The loop on the robot talks only to :class:`Verifier` and :class:`VerifierSession`;
an in-process verifier, the gRPC client (``protocol``) and the ROS topic adapter
(``nodes``) implement it, so one loop and one test suite serve every transport.

Positions are counted in *output* tokens (the prompt excluded): the draft and the
target may tokenize the prompt differently (a VLM target sees image tokens the
text-only draft never does), but they share the output vocabulary.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


class VerifierError(RuntimeError):
    """Base class of errors raised through the Verifier interface.

    Every error carries a machine-readable ``code`` (the class's own unless a more precise one is
    given) and a ``reason`` that says what to do; ``protocol.errors`` is the one table that maps a
    code back to its type, so an error crosses the gRPC and ROS hops as (code, reason) and is raised
    on the robot as the type it was raised as.
    """

    code = "verifier_error"

    def __init__(self, message: str = "", *, code: str | None = None, reason: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.reason = message if reason is None else reason


class SessionNotFound(VerifierError):
    """The verifier has no such session (never opened, closed, or expired)."""

    code = "no_session"


class VerifierTimeout(VerifierError):
    """No verdict arrived within the deadline."""

    code = "timeout"


class LinkLost(VerifierError):
    """The connection to the verifier is gone; open a new session once it is back."""

    code = "link_lost"


class Draining(LinkLost):
    """The verifier is stopping for a restart or a rollout (code ``draining``): it answered the
    blocks already in flight, then ended the session (or refused to open one). Nothing was wrong
    with the request: open it again, on the same address once the server is back or on another,
    and decode the step again."""

    code = "draining"


class Refused(VerifierError):
    """The verifier refused a request; ``code`` and the message say why."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}", code=code, reason=reason)


# Bad input, refused when a session opens (each also on the draft side, before any work).
class EmptyPrompt(Refused):
    """The prompt is empty or blank (code ``empty_prompt``)."""


class PromptTooLong(Refused):
    """The prompt and the new-token budget exceed the model's context (code ``prompt_too_long``)."""


class ImageNotSupported(Refused):
    """An image was sent to a text-only model, or could not be decoded (``image_not_supported``, ``bad_image``)."""


class InvalidArgument(Refused):
    """A field of an Open or a Draft is out of range (code ``invalid_argument``); the reason names the field."""


class LimitExceeded(Refused):
    """A limit of the verifier: sessions, rate, sizes, memory (``too_many_sessions``, ``rate_limited``, ...).

    Retry later, or ask for less; the reason says which limit and what to change.
    """


class StreamingUnavailable(Refused):
    """Cloud autoregressive decoding was asked of a verifier that cannot stream (code ``streaming_unavailable``)."""


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int = 64
    grammar: str = ""  # "" = unconstrained, "command" = the robot command schema
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class SessionRequest:
    prompt: str  # the user message (instruction + scene text)
    system: str = ""  # system message; each side applies its own chat template
    image: bytes | None = None  # JPEG for a VLM target
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    # The user message the draft reads when it is not ``prompt`` ("" = ``prompt``): a text draft serving a
    # VLM target reads the on-robot scene text where the target sees the frame. Only generated tokens are
    # shared and verified, so output stays the target's; it never leaves the robot (no transport carries it).
    draft_prompt: str = ""


@dataclass(frozen=True)
class DraftBlock:
    round: int
    base_length: int  # number of output tokens the block extends
    base_tail: tuple[int, ...]  # last output tokens the block assumes (checked by the verifier)
    tokens: tuple[int, ...]
    preemptive: bool = False
    # Sparse draft distributions, one {token_id: prob} per drafted token (sampling only).
    q: tuple[dict[int, float], ...] | None = None


class VerdictKind(enum.Enum):
    EARLY = 0  # provisional, from an exit layer; a speculation signal only
    FINAL = 1  # from the last layer; the only verdict that decides output
    DROPPED = 2  # the block's assumed prefix did not hold; it was not verified


# Confidence an EARLY verdict needs before the robot drafts on it (the default everywhere: a
# sweep at 20 ms RTT found 0.2 and 0.05 equal and both better than 0.5; see bench/results).
EARLY_THRESHOLD = 0.2


@dataclass(frozen=True)
class Verdict:
    round: int
    kind: VerdictKind
    accepted: int = 0  # leading draft tokens accepted
    token: int = -1  # next token after the accepted prefix (correction or bonus), -1 if none
    confidence: float = 1.0  # EARLY: the exit's probability of `token`
    exit_layer: int = -1  # EARLY: the exit's decoder layer index
    eos: bool = False  # the output is complete after `token`
    verify_time_s: float = 0.0  # verifier-side time spent on this block


class VerifierSession(ABC):
    """One decoding session on a verifier."""

    session_id: str

    @abstractmethod
    def submit(self, block: DraftBlock) -> None:
        """Send a block for verification; returns at once."""

    @abstractmethod
    def next_verdict(self, timeout: float | None = None) -> Verdict:
        """Block until the next verdict (EARLY, FINAL or DROPPED) arrives, in order of sending.

        Raises VerifierTimeout, LinkLost, SessionNotFound or Refused.
        """

    @abstractmethod
    def close(self) -> None:
        """Free the session on the verifier; idempotent."""


class Verifier(ABC):
    @abstractmethod
    def open(self, request: SessionRequest) -> VerifierSession:
        """Open a session (prefills the prompt on the target). Raises Refused on bad input."""
