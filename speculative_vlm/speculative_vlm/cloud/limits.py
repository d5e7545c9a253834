"""Admission checks: what a client may send, and how often.

Every check raises :class:`LimitExceeded` with a machine-readable code and a reason that
says what to change; the service turns it into an ``Error`` message on that client's
stream only.
"""

from __future__ import annotations

import io
import threading
import time

from PIL import Image, UnidentifiedImageError

from speculative_vlm.cloud.config import Limits
from speculative_vlm.decoding.verifier import DraftBlock, SessionRequest


class LimitExceeded(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def check_image(jpeg: bytes, limits: Limits) -> tuple[int, int]:
    """Size of a JPEG that is small enough and decodes; raises LimitExceeded otherwise."""
    if len(jpeg) > limits.max_image_bytes:
        raise LimitExceeded("image_too_large", f"image is {len(jpeg)} bytes, the limit is {limits.max_image_bytes}; "
                            "send a smaller JPEG (lower resolution or quality)")
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            fmt, size = img.format, img.size
            if size[0] * size[1] > limits.max_image_pixels:
                raise LimitExceeded("image_too_large", f"image is {size[0]}x{size[1]} pixels, the limit is "
                                    f"{limits.max_image_pixels} pixels; downscale it")
            img.load()  # decode fully: a truncated JPEG must fail here, not in the model
    except LimitExceeded:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LimitExceeded("bad_image", f"image does not decode ({exc}); send a JPEG") from exc
    if fmt != "JPEG":
        raise LimitExceeded("bad_image", f"image is {fmt}, the protocol carries JPEG; encode it as JPEG")
    return size


def check_open(request: SessionRequest, limits: Limits) -> None:
    if len(request.prompt) > limits.max_prompt_chars:
        raise LimitExceeded("prompt_too_long", f"prompt has {len(request.prompt)} characters, the limit is "
                            f"{limits.max_prompt_chars}; shorten it")
    if not request.prompt.strip():
        raise LimitExceeded("empty_prompt", "the prompt is empty; send the instruction in Open.prompt")
    if len(request.system) > limits.max_system_chars:
        raise LimitExceeded("prompt_too_long", f"system message has {len(request.system)} characters, the limit "
                            f"is {limits.max_system_chars}; shorten it")
    if request.settings.max_new_tokens > limits.max_new_tokens:
        raise LimitExceeded("too_many_tokens", f"max_new_tokens {request.settings.max_new_tokens} exceeds "
                            f"{limits.max_new_tokens}")
    if request.image is not None:
        check_image(request.image, limits)


def check_draft(block: DraftBlock, limits: Limits) -> None:
    """The server's size limit on a block; its fields are checked by ``decoding.admission``."""
    # An empty block is legal: it asks the target for the next token alone (the loop sends
    # one when a single token of budget is left).
    if len(block.tokens) > limits.max_draft_tokens:
        raise LimitExceeded("draft_too_long", f"round {block.round} has {len(block.tokens)} tokens, the limit is "
                            f"{limits.max_draft_tokens}")


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int):
        self._rate = rate
        self._burst = float(max(1, burst))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        """Count one request from ``client``; raises LimitExceeded when over its rate."""
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(client, (self._burst, now))
            level = min(self._burst, level + (now - last) * self._rate)
            if level < 1.0:
                self._buckets[client] = (level, now)
                raise LimitExceeded("rate_limited", f"client {client!r} exceeds {self._rate:g} requests/s; "
                                    "slow down and open a new session")
            self._buckets[client] = (level - 1.0, now)
