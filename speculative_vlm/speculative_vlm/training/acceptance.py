"""How well a draft predicts the target: greedy speculative rounds replayed on known answers.

The target's constrained greedy answer is known for every held-out prompt, so a round of
speculative decoding can be replayed without running the target: the draft proposes
``gamma`` tokens (under the same grammar mask as the target for command prompts), the
longest prefix equal to the target's answer is accepted, and the target's next token
comes free with the verification pass. This gives exactly the acceptance that lossless
greedy verification would see, and tokens per target pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speculative_vlm.training.teacher_data import Example


@dataclass(frozen=True)
class AcceptanceReport:
    """Counts of a replay of greedy speculative decoding; the figures derive from them."""

    gamma: int
    prompts: int
    rounds: int  # target passes
    drafted: int
    accepted: int
    answer_tokens: int
    forced: int = 0  # answer tokens the grammar forced, appended without drafting or a target pass

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the target accepts."""
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_pass(self) -> float:
        return self.answer_tokens / max(self.rounds, 1)

    @property
    def accepted_per_round(self) -> float:
        return self.accepted / max(self.rounds, 1)

    @classmethod
    def total(cls, reports: Sequence[AcceptanceReport]) -> AcceptanceReport:
        """The report over all the prompts of ``reports`` (measured at one gamma): every count adds up."""
        gammas = {r.gamma for r in reports}
        if len(gammas) != 1:
            raise ValueError(f"reports at gammas {sorted(gammas)} do not add up; measure them at one gamma")
        return cls(gammas.pop(), *(sum(getattr(r, name) for r in reports)
                                  for name in ("prompts", "rounds", "drafted", "accepted", "answer_tokens", "forced")))

    def line(self) -> str:
        forced = f" ({self.forced} of {self.answer_tokens} tokens forced by the grammar)" if self.forced else ""
        return (f"acceptance {self.acceptance:.3f} at {self.gamma} tokens/block over {self.prompts} prompts, "
                f"{self.accepted_per_round:.2f} accepted per round, {self.tokens_per_pass:.2f} tokens per target pass{forced}")


@torch.inference_mode()
def measure(model, examples: Sequence[Example], gamma: int = 4, compiled_grammar=None,
            stop_ids: frozenset[int] = frozenset(), force: bool = False) -> AcceptanceReport:
    """Replay greedy speculative decoding of ``examples`` with ``model`` as the draft.

    ``compiled_grammar`` masks the draft's proposals for command examples (the target's
    answers were produced under it); general examples are drafted unconstrained. With
    ``force``, tokens the grammar forces (only one allowed) are appended before each round
    without drafting them, as the engine does, so they count towards no acceptance.
    """
    import xgrammar as xgr

    rounds = drafted_total = accepted_total = tokens = forced_total = 0
    shifts = torch.arange(32, dtype=torch.int32)
    vocab = model.config.vocab_size
    bitmask = xgr.allocate_token_bitmask(1, vocab) if compiled_grammar is not None else None
    for e in examples:
        matcher = xgr.GrammarMatcher(compiled_grammar) if compiled_grammar is not None and e.kind == "command" else None
        answer, i = e.answer_ids, 0
        cache, valid = None, 0  # the draft's KV cache and how many leading tokens of it are still right
        while i < len(answer):
            if force and matcher is not None:
                while i < len(answer) and not matcher.is_terminated():
                    matcher.fill_next_token_bitmask(bitmask, 0)
                    if int(((bitmask[0].unsqueeze(-1) >> shifts) & 1).sum()) != 1:
                        break
                    matcher.accept_token(answer[i])
                    i += 1
                    forced_total += 1
                if i >= len(answer):
                    break
            ctx = e.prompt_ids + answer[:i]
            # Reuse the cache up to the first wrong token; feed the rest of the context.
            keep = min(valid, len(ctx) - 1)
            if cache is not None:
                cache.crop(keep - cache.get_seq_length())  # transformers 5: a negative count to drop
            out = model(input_ids=torch.tensor([ctx[keep:]]), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            drafted: list[int] = []
            for _ in range(gamma):
                logits = out.logits[:, -1, :vocab].float()
                if matcher is not None:
                    matcher.fill_next_token_bitmask(bitmask, 0)
                    xgr.apply_token_bitmask_inplace(logits, bitmask)
                token = int(logits.argmax(-1))
                drafted.append(token)
                if matcher is not None:
                    matcher.accept_token(token)
                    if matcher.is_terminated():
                        break
                elif token in stop_ids:
                    break
                if len(drafted) < gamma:
                    out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                                use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            if matcher is not None:
                matcher.rollback(len(drafted))
            k = 0
            while k < len(drafted) and i + k < len(answer) and drafted[k] == answer[i + k]:
                k += 1
            # The cache holds ctx and every drafted token but the last; the first k drafted are right.
            valid = len(ctx) + min(k, len(drafted) - 1)
            advance = min(k + 1, len(answer) - i)
            if matcher is not None:
                for token in answer[i : i + advance]:
                    matcher.accept_token(token)
            rounds += 1
            drafted_total += len(drafted)
            accepted_total += k
            i += advance
        tokens += len(answer)
    return AcceptanceReport(gamma, len(examples), rounds, drafted_total, accepted_total, tokens, forced_total)
