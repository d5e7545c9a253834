"""Admission checks: every field of an Open (``SessionRequest``) and a Draft (``DraftBlock``)
is checked before anything touches a batch or a cache, and anything out of range is refused.

The checks fail closed: a value is admitted only when it is of the right type, finite and in
range (``nan`` fails every comparison, so each check is written as "admit when in range",
never as "refuse when out of range"). A refusal is an :class:`InvalidArgument` (code
``invalid_argument``) whose reason names the field as the wire message spells it, e.g.
``draft.q[3].probs[0] is nan``. The target engine runs them on every session and block
(so the in-process verifier and the gRPC service share them), and the gRPC service runs
them once more on each message as it arrives, before the block is queued.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real

from speculative_vlm.decoding.verifier import DraftBlock, GenerationSettings, InvalidArgument, SessionRequest

# Sampling temperature above which every distribution is uniform to float precision anyway.
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 2**31 - 1  # int32 on the wire
MAX_SEED = 2**64 - 1  # uint64 on the wire (torch.Generator.manual_seed takes the whole range)
MAX_ROUND = 2**32 - 1  # uint32 on the wire
MAX_GRAMMAR_NAME = 256
# A sparse draft distribution may sum to slightly more than 1 from float rounding, never more.
PROB_SUM_SLACK = 1e-3


def _refuse(field: str, value: object, want: str) -> InvalidArgument:
    return InvalidArgument("invalid_argument", f"{field} is {value!r}; send {want}")


def _integer(field: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or not low <= int(value) <= high:
        raise _refuse(field, value, f"an integer in [{low}, {high}]")
    return int(value)


def _real(field: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        x = float(value)
        ok = (low < x if low_open else low <= x) and x <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise _refuse(field, value, f"a finite number in {bracket}{low:g}, {high:g}]")
    return float(value)


def check_settings(settings: GenerationSettings, max_new_tokens: int | None = None, field: str = "open.settings") -> None:
    """Refuse sampling settings that are not finite and in range; ``max_new_tokens`` bounds the budget."""
    if not isinstance(settings, GenerationSettings):
        raise _refuse(field, type(settings).__name__, "a GenerationSettings")
    _real(f"{field}.temperature", settings.temperature, 0.0, MAX_TEMPERATURE)
    _integer(f"{field}.top_k", settings.top_k, 0, MAX_TOP_K)
    _real(f"{field}.top_p", settings.top_p, 0.0, 1.0, low_open=True)
    budget = max_new_tokens if max_new_tokens is not None else 2**31 - 1
    _integer(f"{field}.max_new_tokens", settings.max_new_tokens, 1, max(1, budget))
    if not isinstance(settings.grammar, str) or len(settings.grammar) > MAX_GRAMMAR_NAME:
        raise _refuse(f"{field}.grammar", settings.grammar, f"a grammar name of at most {MAX_GRAMMAR_NAME} characters")
    _integer(f"{field}.seed", settings.seed, 0, MAX_SEED)


def check_request(request: SessionRequest, max_new_tokens: int | None = None) -> None:
    """Refuse an Open whose fields have the wrong types or whose settings are out of range.

    Prompt length and image size limits are the server's (``cloud.limits``); the model
    refuses an empty prompt or one that does not fit its context.
    """
    for name in ("prompt", "system"):
        if not isinstance(getattr(request, name), str):
            raise _refuse(f"open.{name}", type(getattr(request, name)).__name__, "text")
    if request.image is not None and not isinstance(request.image, (bytes, bytearray)):
        raise _refuse("open.image_jpeg", type(request.image).__name__, "JPEG bytes or no image")
    check_settings(request.settings, max_new_tokens)


def _token(field: str, value: object, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= int(value) < vocab_size:
        raise InvalidArgument("invalid_argument", f"{field} is {value!r}, outside the vocabulary [0, {vocab_size}); "
                              "send token ids of the target's vocabulary (Opened.vocab_size)")


def check_block(block: DraftBlock, vocab_size: int, settings: GenerationSettings | None = None,
                max_tokens: int | None = None) -> None:
    """Refuse a Draft with a field out of range or lengths that do not agree.

    ``settings`` (the session's) bounds ``base_length`` by the output budget; ``max_tokens``
    bounds the number of drafted tokens. Checked: round and base_length ranges, base_tail no
    longer than base_length, every token id within the vocabulary, one draft distribution per
    token (or none), and in each distribution ids within the vocabulary and probabilities
    finite in [0, 1] that sum to at most 1.
    """
    if not isinstance(block, DraftBlock):
        raise _refuse("draft", type(block).__name__, "a DraftBlock")
    _integer("draft.round", block.round, 0, MAX_ROUND)
    budget = settings.max_new_tokens if settings is not None else MAX_ROUND
    base_length = _integer("draft.base_length", block.base_length, 0, budget)
    if not isinstance(block.base_tail, Sequence) or len(block.base_tail) > base_length:
        raise InvalidArgument("invalid_argument", f"draft.base_tail has {_length(block.base_tail)} tokens for a "
                              f"base_length of {base_length}; send at most base_length assumed tokens")
    for i, t in enumerate(block.base_tail):
        _token(f"draft.base_tail[{i}]", t, vocab_size)
    if not isinstance(block.tokens, Sequence):
        raise _refuse("draft.tokens", type(block.tokens).__name__, "a sequence of token ids")
    if max_tokens is not None and len(block.tokens) > max_tokens:
        raise InvalidArgument("invalid_argument", f"draft.tokens has {len(block.tokens)} tokens, the limit is "
                              f"{max_tokens}; draft fewer tokens per block")
    for i, t in enumerate(block.tokens):
        _token(f"draft.tokens[{i}]", t, vocab_size)
    if not isinstance(block.preemptive, bool):
        raise _refuse("draft.preemptive", block.preemptive, "true or false")
    if block.q is None:
        return
    if not isinstance(block.q, Sequence) or len(block.q) != len(block.tokens):
        raise InvalidArgument("invalid_argument", f"draft.q has {_length(block.q)} distributions for "
                              f"{len(block.tokens)} tokens; send one per token, or none for a greedy draft")
    for i, dist in enumerate(block.q):
        check_distribution(dist, vocab_size, f"draft.q[{i}]")


def check_distribution(dist: Mapping[int, float], vocab_size: int, field: str) -> None:
    """Refuse a sparse distribution {token: prob} unless ids are in the vocabulary and probs finite in [0, 1]."""
    if not isinstance(dist, Mapping):
        raise _refuse(field, type(dist).__name__, "a sparse distribution {token_id: probability}")
    total = 0.0
    for j, (token, prob) in enumerate(dist.items()):
        _token(f"{field}.token_ids[{j}]", token, vocab_size)
        total += _real(f"{field}.probs[{j}]", prob, 0.0, 1.0)
    if not total <= 1.0 + PROB_SUM_SLACK:
        raise InvalidArgument("invalid_argument", f"{field}.probs sum to {total:.6g}; a draft distribution sums "
                              "to at most 1")


def _length(value: object) -> object:
    try:
        return len(value)  # type: ignore[arg-type]
    except TypeError:
        return repr(value)
