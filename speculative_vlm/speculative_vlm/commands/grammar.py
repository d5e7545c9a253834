"""The command grammar: one compact, bounded JSON command, compiled with xgrammar.

The grammar is derived from :func:`speculative_vlm.commands.schema.json_schema`'s limits
but is stricter than the JSON schema in the ways that cost tokens: keys come in the fixed
order of :data:`~speculative_vlm.commands.schema.FIELDS`, there is no whitespace
(``{"action":"move","vx":0.5,...}``: 31 tokens for SmolLM2's tokenizer against 40 with
", " separators), and every number is written with exactly one decimal digit inside its
limits (``-0.5``, ``0.0``, ``1.0``). So every text the grammar admits is accepted by
:func:`parse_command`, and a constrained run is short.

Both the draft and the target compile the same grammar for the same vocabulary, so their
masks are identical (see ``speculative_vlm.decoding.grammar`` for the decoding side).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence

from speculative_vlm.commands.schema import DEFAULT_LIMITS, FIELDS, Action, Limits, LocomotionCommand

#: Names accepted by ``GenerationSettings.grammar``.
GRAMMAR_NAMES = ("command",)


class GrammarNotFound(ValueError):
    """An unknown grammar name was requested."""


def _one_decimal_values(lo: float, hi: float) -> list[str]:
    # Values k/10 inside [lo, hi]; "-0.0" never appears (it is written "0.0").
    first, last = math.ceil(round(lo * 10, 6)), math.floor(round(hi * 10, 6))
    out = []
    for k in range(first, last + 1):
        sign = "-" if k < 0 else ""
        out.append(f"{sign}{abs(k) // 10}.{abs(k) % 10}")
    return out


def _alternatives(values: Sequence[str]) -> str:
    return " | ".join(json.dumps(v) for v in values)


def command_ebnf(limits: Limits = DEFAULT_LIMITS) -> str:
    """The EBNF (xgrammar dialect) of one command under ``limits``."""
    ranges = {
        "vx": (limits.min_vx, limits.max_vx),
        "vy": (-limits.max_vy, limits.max_vy),
        "vyaw": (-limits.max_vyaw, limits.max_vyaw),
        "duration": (0.0, limits.max_duration),
    }
    parts = ['"{"']
    for i, key in enumerate(FIELDS):
        sep = "" if i == 0 else '"," '
        parts.append(f'{sep}"\\"{key}\\":" {key}_value')
    parts.append('"}"')
    lines = ["root ::= " + " ".join(parts)]
    lines.append("action_value ::= " + _alternatives([json.dumps(a.value) for a in Action]))
    for key, (lo, hi) in ranges.items():
        lines.append(f"{key}_value ::= " + _alternatives(_one_decimal_values(lo, hi)))
    return "\n".join(lines) + "\n"


def command_text(command: LocomotionCommand) -> str:
    """The text the command grammar writes for ``command``: fixed key order, no spaces, one decimal.

    Numbers are rounded to one decimal (what a constrained model can say); a value outside the
    grammar's limits stays outside, so the grammar (and :func:`parse_command`) would refuse it.
    """

    def number(value: float) -> str:
        return f"{round(value, 1) + 0.0:.1f}"  # + 0.0 turns -0.0 into 0.0, as the grammar writes it

    values = [json.dumps(command.action.value)] + [number(getattr(command, k)) for k in FIELDS[1:]]
    return "{" + ",".join(f'"{k}":{v}' for k, v in zip(FIELDS, values, strict=True)) + "}"


def grammar_source(name: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """EBNF of a named grammar; raises GrammarNotFound naming the known ones."""
    if name == "command":
        return command_ebnf(limits)
    raise GrammarNotFound(f"unknown grammar {name!r}; known grammars: {list(GRAMMAR_NAMES)} (or '' for none)")


_cache: dict[tuple, object] = {}
_cache_lock = threading.Lock()


def compile_grammar(
    name: str,
    tokenizer,
    vocab_size: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    limits: Limits = DEFAULT_LIMITS,
):
    """Compile a named grammar for a Hugging Face tokenizer; returns ``xgrammar.CompiledGrammar``.

    ``vocab_size`` is the model's output size (it may exceed the tokenizer's), and
    ``stop_token_ids`` the tokens that end the output (the model's EOS). Compiled grammars
    are cached per tokenizer, vocabulary, stop tokens and limits (compiling takes ~0.2 s).
    """
    import xgrammar as xgr

    source = grammar_source(name, limits)
    stops = tuple(sorted(set(stop_token_ids))) if stop_token_ids else None
    key = (id(tokenizer), vocab_size, stops, source)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            return hit[1]
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stops) if stops else None
        )
        compiled = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(source)
        # Keep the tokenizer alive with its entry so id() is never reused for another one.
        _cache[key] = (tokenizer, compiled)
        return compiled


def hf_logits_processor(compiled):
    """A transformers LogitsProcessor that constrains ``model.generate`` with ``compiled`` (batch 1).

    For producing training answers or references with stock ``generate``; the speculative
    engine masks logits itself (``speculative_vlm.decoding.grammar``).
    """
    import xgrammar as xgr

    return xgr.contrib.hf.LogitsProcessor(compiled)
