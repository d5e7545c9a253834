"""The engine side of grammar-constrained decoding: masks, advance, rollback, forced tokens.

Wraps an ``xgrammar.GrammarMatcher`` compiled by ``speculative_vlm.commands.grammar``.
Draft and target each hold one per sequence and apply the same mask to their logits, so
a token the grammar forbids is never drafted and never accepted. A token is *forced* when
it is the only one the grammar allows; such tokens are appended on both sides without
drafting or verifying (a choice of one costs no model pass).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class GrammarViolation(ValueError):
    """A token the grammar does not allow was committed; the two sides' grammars disagree."""


class GrammarConstraint:
    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        # On the host whatever torch's default device is (xgrammar's allocate_token_bitmask takes the
        # default, and the matcher fills the bitmask in host memory).
        self._bitmask = torch.full(xgr.get_bitmask_shape(1, vocab_size), -1, dtype=xgr.bitmask_dtype, device="cpu")
        self.vocab_size = vocab_size
        self.steps = 0  # tokens accepted so far (rollback depth available)

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def allowed(self) -> torch.Tensor:
        """Bool mask (vocab_size,) of the tokens allowed next, on the host (xgrammar runs there);
        :func:`apply_mask` and the narrowed heads take it to the logits' device."""
        return torch.from_numpy(self._allowed())

    def _allowed(self) -> np.ndarray:
        if self.terminated:
            return np.zeros(self.vocab_size, dtype=bool)
        self._matcher.fill_next_token_bitmask(self._bitmask)
        # Bit i of 32-bit word w is token 32 w + i (little-endian); numpy unpacks it in
        # microseconds, where torch shifts and reductions took ~20 ms per call.
        bits = np.unpackbits(self._bitmask[0].numpy().view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(int(token)):
            raise GrammarViolation(f"token {token} is not allowed by the grammar here")
        self.steps += 1

    def rollback(self, n: int) -> None:
        if n:
            self._matcher.rollback(n)
            self.steps -= n

    def forced_token(self) -> int | None:
        """The only allowed token, or None when there is a choice (or nothing is left)."""
        mask = self._allowed()
        if np.count_nonzero(mask) == 1:
            return int(np.flatnonzero(mask)[0])
        return None

    def masks_along(self, tokens: Sequence[int]) -> torch.Tensor:
        """Masks (len(tokens)+1, V) before each token and after the last, without moving the matcher.

        Past the first disallowed token the remaining masks are all-False (those positions
        can never be accepted).
        """
        masks = torch.zeros((len(tokens) + 1, self.vocab_size), dtype=torch.bool, device="cpu")  # host-side
        advanced = 0
        for i, t in enumerate(tokens):
            masks[i] = self.allowed()
            if not masks[i, t] or not self._matcher.accept_token(int(t)):
                break
            advanced += 1
        else:
            masks[len(tokens)] = self.allowed()
        if advanced:
            self._matcher.rollback(advanced)
        return masks


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits (..., V') with disallowed tokens at -inf; V' may exceed the mask's vocabulary.

    The mask is taken to the logits' device (a no-op when it is there already).
    """
    mask = mask.to(logits.device)
    if logits.shape[-1] != mask.shape[-1]:
        full = torch.zeros(mask.shape[:-1] + (logits.shape[-1],), dtype=torch.bool, device=logits.device)
        full[..., : mask.shape[-1]] = mask
        mask = full
    return logits.masked_fill(~mask, float("-inf"))
