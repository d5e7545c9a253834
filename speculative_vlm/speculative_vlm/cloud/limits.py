"""Admission checks: what a client may send, and how often.

Every check raises :class:`LimitExceeded` with a machine-readable code and a reason that
says what to change; the service turns it into an ``Error`` message on that client's
stream only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import threading
import time

from PIL import Image, UnidentifiedImageError

from speculative_vlm.cloud.config import ServerLimits
from speculative_vlm.decoding.verifier import DraftBlock, LimitExceeded, SessionRequest


def check_image(jpeg: bytes, limits: ServerLimits) -> tuple[int, int]:
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


def check_open(request: SessionRequest, limits: ServerLimits) -> None:
    """What can be checked of an Open before tokenizing it (the token limit comes after)."""
    # A cheap bound on the tokenizer's work; the limit that matters is check_prompt_tokens'.
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


def check_prompt_tokens(tokens: int, limits: ServerLimits) -> None:
    """Refuse a prompt longer than the limit, counted in tokens after the chat template and the image."""
    if tokens > limits.max_prompt_tokens:
        raise LimitExceeded("prompt_too_long", f"the prompt is {tokens} tokens after the chat template "
                            f"(and image), the limit is {limits.max_prompt_tokens}; shorten the instruction "
                            "or the system message")


def check_draft(block: DraftBlock, limits: ServerLimits) -> None:
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


class KVBudget:
    """The memory of all sessions' KV caches, reserved at Open and given back at close.

    A session reserves ``bytes_per_token`` x (prompt tokens + max_new_tokens + one block):
    the most its cache can hold. A session that would take the total over the budget, or
    its client over the client's share of it (``client_share``: the client's share of the
    sessions, so one client cannot take the memory everyone else needs), is refused with
    ``kv_budget_exceeded``: a burst of long prompts cannot grow the server's memory past
    what the operator allowed. (A batched pass briefly stacks the caches of its items on
    top of this; that is bounded by max_batch sessions' worth.)
    """

    def __init__(self, budget_bytes: int, bytes_per_token: int, client_share: float = 1.0):
        self.budget_bytes = int(budget_bytes)
        self.bytes_per_token = int(bytes_per_token)
        self.client_bytes = int(budget_bytes * min(1.0, client_share))
        self._held: dict[str, tuple[str, int]] = {}  # holder: (client, bytes)
        self._released = 0  # bytes given back since take_released()
        self._lock = threading.Lock()

    def reserve(self, holder: str, client: str, tokens: int) -> int:
        """Reserve the cache of ``tokens`` tokens for ``holder`` of ``client``; raises LimitExceeded."""
        need = tokens * self.bytes_per_token
        with self._lock:
            used = sum(b for _, b in self._held.values())
            mine = sum(b for c, b in self._held.values() if c == client)
            if used + need > self.budget_bytes:
                where = f"{_size(used)} of the server's {_size(self.budget_bytes)} are taken"
            elif mine + need > self.client_bytes:
                where = f"client {client!r} holds {_size(mine)} of its {_size(self.client_bytes)} share"
            else:
                self._held[holder] = (client, need)
                return need
        raise LimitExceeded("kv_budget_exceeded", (
            f"this session's KV cache needs {_size(need)} ({tokens} tokens x {self.bytes_per_token} bytes) "
            f"and {where}; close a session, retry later, or ask for fewer tokens (a shorter prompt, a "
            "smaller max_new_tokens)"))

    def release(self, holder: str) -> None:
        with self._lock:
            _, given_back = self._held.pop(holder, ("", 0))
            self._released += given_back

    def take_released(self) -> int:
        """Bytes given back since the last call (to decide when to return freed memory to the OS)."""
        with self._lock:
            released, self._released = self._released, 0
            return released

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(b for _, b in self._held.values())


def return_free_memory() -> bool:
    """Give the C allocator's free memory back to the OS (glibc ``malloc_trim``); False where there is none.

    A closed session's cache (tens of MB for a long prompt) goes back to glibc's heap, which
    keeps it: without this the server's RSS stays at its peak after a burst of long prompts.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} kB" if n >= 2**10 else f"{n} B"
