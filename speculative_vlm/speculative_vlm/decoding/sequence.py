"""The rules of a growing output shared by draft and target: EOS, grammar, budget, forced tokens.

Both sides keep an :class:`OutputTracker` over the same output; because they apply the
same rules, they agree on when the output ends and on which tokens the grammar forces
after each verdict, without exchanging them.
"""

from __future__ import annotations

from collections.abc import Iterable

from speculative_vlm.decoding.grammar import GrammarConstraint


class OutputTracker:
    def __init__(self, eos_ids: Iterable[int], max_new_tokens: int, grammar: GrammarConstraint | None = None):
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.max_new_tokens = max_new_tokens
        self.grammar = grammar
        self.tokens: list[int] = []

    @property
    def done(self) -> bool:
        if len(self.tokens) >= self.max_new_tokens:
            return True
        if self.tokens and self.tokens[-1] in self.eos_ids:
            return True
        return self.grammar is not None and self.grammar.terminated

    @property
    def room(self) -> int:
        return 0 if self.done else self.max_new_tokens - len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            if self.grammar is not None:
                self.grammar.accept(t)
            self.tokens.append(int(t))

    def truncate(self, length: int) -> None:
        drop = len(self.tokens) - length
        if drop > 0:
            if self.grammar is not None:
                self.grammar.rollback(drop)
            del self.tokens[length:]

    def append_forced(self) -> list[int]:
        """Append the tokens the grammar forces from here (none without a grammar)."""
        forced: list[int] = []
        while self.grammar is not None and not self.done:
            t = self.grammar.forced_token()
            if t is None:
                break
            self.extend([t])
            forced.append(t)
        return forced

    def mask(self):
        """Allowed-token mask for the next token, or None when unconstrained."""
        return None if self.grammar is None else self.grammar.allowed()
