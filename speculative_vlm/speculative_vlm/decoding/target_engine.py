"""The target side: sessions, batched verification with early exits, and target-alone generation.

Used by the in-process verifier and by the cloud gRPC server alike::

    engine = TargetEngine(load_model(path), exit_layers=[20, 24])
    sess = engine.open_session(request)              # prefill; raises Refused on bad input
    verdicts = engine.verify([(sess, block)], on_early=callback)   # one forward pass
    engine.close_session(sess)

``verify`` runs ONE forward pass for all items (one block per session), with the
sessions' caches stacked. At each exit layer a forward hook computes the provisional
verdict of every item from the exit head and calls ``on_early`` before the later layers
run. The returned verdicts are decided by the final layer alone. A block whose assumed
prefix (``base_length``/``base_tail``) is not the session's committed output is not
verified: its verdict is DROPPED.

``verify`` is transactional per item: each block is admitted (``decoding.admission``) before
the pass, and each item's early verdict, verification rules and commit run apart from the
others' and touch only its own session. An item that fails gets its exception in place of
its verdict and its session is left as it was before the pass; every other item's verdict,
output and cache are exactly what they would be had the failing item never been batched
with it. Nothing is retried.

The engine runs where its model runs (``model.device``, ``model.dtype``): sessions' caches,
sampling generators, grammar masks (made on the host by xgrammar, copied to the device once
per block), logits and probabilities all live there, and the rules decide on float32 logits.
On a GPU the host waits for the device at chosen points only: once before a pass (which
tokens the grammar allows, for the narrowed head, while the device is idle anyway), once per
item for its verdict (``rules.verify_greedy`` reads back one small tensor), and twice per item
and exit for an early verdict (its outcome, its confidence).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from speculative_vlm.decoding import admission, rules
from speculative_vlm.decoding.exits import ExitHeads, load_exit_heads
from speculative_vlm.decoding.grammar import GrammarConstraint, apply_mask
from speculative_vlm.decoding.models import KVState, ModelAdapter, Prefill
from speculative_vlm.decoding.sequence import OutputTracker
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    Refused,
    SessionNotFound,
    SessionRequest,
    Verdict,
    VerdictKind,
)

EarlyCallback = Callable[["TargetSession", Verdict], None]

# Prompt ids per prefill step. On SmolLM2-135M (fp32, one CPU thread) a 256-id chunk costs 0.4 s at
# the start of a prompt to 0.85 s at 2,048 ids in (1.2 s with other jobs on the cores); 128 halves it.
DEFAULT_PREFILL_CHUNK = 256

log = logging.getLogger("speculative_vlm.decoding.target_engine")


def make_tracker(model: ModelAdapter, request: SessionRequest) -> OutputTracker:
    """The output rules of a request on a model (EOS, budget, grammar); same on both sides."""
    grammar = None
    if request.settings.grammar:
        from speculative_vlm.commands.grammar import GrammarNotFound, compile_grammar

        try:
            compiled = compile_grammar(
                request.settings.grammar, model.tokenizer, model.vocab_size, model.eos_token_ids
            )
        except GrammarNotFound as exc:
            raise Refused("unknown_grammar", str(exc)) from None
        grammar = GrammarConstraint(compiled, model.vocab_size)
    return OutputTracker(model.eos_token_ids, request.settings.max_new_tokens, grammar)


@dataclass
class TargetSession:
    session_id: str
    request: SessionRequest
    kv: KVState
    out: OutputTracker
    generator: torch.Generator
    rounds: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False

    @property
    def output(self) -> list[int]:
        return self.out.tokens

    @property
    def done(self) -> bool:
        return self.out.done


@dataclass
class SessionPrefill:
    """A session being opened: its request encoded, its prompt prefilled a chunk per step."""

    request: SessionRequest
    out: OutputTracker
    prefill: Prefill

    @property
    def prompt_tokens(self) -> int:
        return len(self.prefill.prompt.ids)

    @property
    def steps(self) -> int:
        return self.prefill.steps

    @property
    def done(self) -> bool:
        return self.prefill.done


@dataclass
class _Item:
    session: TargetSession
    block: DraftBlock
    tokens: list[int]  # the block's tokens that are verified (trimmed to the budget)
    fed: int  # tokens fed this pass (uncached ids + block)
    masks: torch.Tensor | None  # grammar masks (k+1, V)
    # The session as it was before this pass, restored when this item fails.
    ids_before: int
    cached_before: int
    out_before: int
    rng_before: torch.Tensor | None  # sampling sessions' generator state


class TargetEngine:
    """The target model's side of speculative decoding: sessions, batched verification, generation alone.

    It holds the target (``model``) and its early-exit heads (``exit_layers``, or trained
    ``exit_heads``), and knows nothing of transports or threads: the verification core
    (``decoding.scheduler``'s :class:`~speculative_vlm.decoding.scheduler.BatchScheduler` over a
    ``SessionStore``) calls it from one thread, for the in-process verifier and the gRPC service
    alike. See the module docstring for the usage and for what ``verify`` guarantees.

    - :meth:`open_session` encodes and prefills a request (raises ``Refused`` kinds on bad input);
      a server splits it into :meth:`begin_session`, :meth:`prefill_step` (one chunk of
      ``prefill_chunk_tokens`` ids per call, between other sessions' passes) and
      :meth:`finish_session`.
    - :meth:`verify` checks one block per session, up to ``max_batch`` sessions per forward pass,
      calling ``on_early`` with each exit's provisional verdict mid-pass; the FINAL verdicts
      (from the last layer alone) decide the output.
    - :meth:`generate` yields the target's own tokens, one pass each (cloud autoregressive).
    - :meth:`close_session` frees a session's KV cache. ``sessions`` holds the open ones
      (the engine's record of the caches it owns); ``passes`` and ``largest_batch`` count its work.
    """

    def __init__(
        self,
        model: ModelAdapter,
        exit_layers=(),
        exit_heads: ExitHeads | str | os.PathLike | None = None,
        max_batch: int = 8,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
    ):
        self.model = model
        if isinstance(exit_heads, ExitHeads):
            self.exits = exit_heads
        elif exit_heads:
            self.exits = load_exit_heads(exit_heads, model, layers=exit_layers or None)
        else:
            self.exits = ExitHeads(model, exit_layers)
        self.max_batch = max(1, int(max_batch))
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # one forward pass at a time
        self._encode_lock = threading.Lock()
        # Prompts are prefilled this many ids per step (0 = at once); the server interleaves steps
        # with verification passes. The same size everywhere keeps every side's prefill the same.
        self.prefill_chunk_tokens = max(0, int(prefill_chunk_tokens))
        self.sessions: dict[str, TargetSession] = {}
        self.passes = 0  # forward passes run by verify()
        self.largest_batch = 0  # most blocks verified in one pass

    @property
    def exit_layers(self) -> list[int]:
        return list(self.exits.layers)

    # ---- sessions ------------------------------------------------------------------------
    def open_session(self, request: SessionRequest) -> TargetSession:
        """Encode and prefill the prompt; raises Refused (InvalidArgument, EmptyPrompt, PromptTooLong, ...)."""
        pending = self.begin_session(request)
        while not pending.done:
            self.prefill_step(pending)
        return self.finish_session(pending)

    def begin_session(self, request: SessionRequest) -> SessionPrefill:
        """Encode a request for a chunked prefill (no model work yet); raises Refused like open_session.

        A server runs :meth:`prefill_step` until ``done``, between other sessions' passes,
        then :meth:`finish_session`; ``prompt_tokens`` is the prompt's length as the model
        sees it (chat template and image included), for the server's limits.
        """
        admission.check_request(request, max_new_tokens=self.model.max_context)
        with self._encode_lock:  # the tokenizer and grammar compiler are shared by every stream thread
            prompt = self.model.encode(request)
            out = make_tracker(self.model, request)
        return SessionPrefill(request, out, Prefill(self.model, prompt, self.prefill_chunk_tokens))

    def prefill_step(self, pending: SessionPrefill) -> bool:
        """Run one chunk of ``pending``'s prefill (at most ``prefill_chunk_tokens`` ids); True when done."""
        with self._lock:
            pending.prefill.step()
        return pending.done

    def finish_session(self, pending: SessionPrefill) -> TargetSession:
        """The open session of a finished prefill."""
        if not pending.done:
            raise ValueError("finish_session() before the prefill is done; run prefill_step() until it is")
        kv, out, request = pending.prefill.state, pending.out, pending.request
        gen = torch.Generator(device=self.model.device).manual_seed(int(request.settings.seed))
        sess = TargetSession(f"t{next(self._ids)}", request, kv, out, gen)
        # Tokens the grammar forces before any choice are output at once, as the drafter does.
        kv.append(out.append_forced())
        self.sessions[sess.session_id] = sess
        return sess

    @property
    def kv_bytes_per_token(self) -> int:
        """Memory of one token's keys and values in every layer (what a session's cache costs per token)."""
        text = self.model.model.config.get_text_config(decoder=True)
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return 2 * text.num_hidden_layers * kv_heads * head_dim * self.model.dtype.itemsize

    def close_session(self, sess: TargetSession) -> None:
        sess.closed = True
        self.sessions.pop(sess.session_id, None)
        with self._lock:  # a pass using this cache (batched with others) finishes first
            sess.kv.cache = None  # free the cache now, not when the last reference goes

    # ---- verification --------------------------------------------------------------------
    def verify(
        self, items: list[tuple[TargetSession, DraftBlock]], on_early: EarlyCallback | None = None
    ) -> list[Verdict | Exception]:
        """Verify one block per session in one forward pass: a FINAL or DROPPED verdict per item, in order.

        An item that fails has its exception in its place instead: SessionNotFound (closed
        session), InvalidArgument (a field of the block out of range), Refused (finished
        output), or whatever went wrong while deciding or committing its verdict. Its session
        is left as before the pass, and no other item is affected (see the module docstring).
        A failure of the forward pass itself fails every item of that pass, each left as before.
        """
        if len({id(s) for s, _ in items}) != len(items):
            raise ValueError("verify() takes at most one block per session per pass")
        start = time.perf_counter()
        results: list[Verdict | Exception | None] = [None] * len(items)
        live: list[tuple[int, _Item]] = []
        for i, (sess, block) in enumerate(items):
            try:
                item = self._admit(sess, block)
            except Exception as exc:  # this block's own refusal; the others go on
                results[i] = exc
                continue
            if item is None:
                results[i] = Verdict(block.round, VerdictKind.DROPPED)
            else:
                live.append((i, item))
        for chunk_start in range(0, len(live), self.max_batch):
            chunk = live[chunk_start : chunk_start + self.max_batch]
            for (i, _), result in zip(chunk, self._verify_pass([it for _, it in chunk], on_early, start), strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def _admit(self, sess: TargetSession, block: DraftBlock) -> _Item | None:
        """The item to verify for ``block``, None when it is DROPPED; raises when it is refused.

        Reads the session and changes nothing (the grammar is advanced and rolled back).
        """
        if sess.closed:
            raise SessionNotFound(f"session {sess.session_id} is closed; open a new one")
        admission.check_block(block, self.model.vocab_size, sess.request.settings)
        if not self._prefix_holds(sess, block):
            return None
        if sess.done:
            raise Refused("session_done", f"session {sess.session_id} has finished its output; close it")
        tokens = list(block.tokens[: max(0, sess.out.room - 1)])
        # Nothing past the output's end is verified: a draft token after an EOS could otherwise be
        # accepted and committed beyond the end (and past a grammar's end, where nothing is allowed).
        for j, t in enumerate(tokens):
            if t in self.model.eos_token_ids:
                del tokens[j + 1 :]
                break
        masks = sess.out.grammar.masks_along(tokens).to(self.model.device) if sess.out.grammar is not None else None
        uncached = len(sess.kv.ids) - sess.kv.cached
        greedy = sess.request.settings.greedy
        return _Item(sess, block, tokens, max(uncached, 1) + len(tokens), masks, ids_before=len(sess.kv.ids),
                     cached_before=sess.kv.cached, out_before=len(sess.out.tokens),
                     rng_before=None if greedy else sess.generator.get_state())

    def _prefix_holds(self, sess: TargetSession, block: DraftBlock) -> bool:
        out = sess.output
        if block.base_length != len(out):
            return False
        tail = list(block.base_tail)
        return not tail or (len(tail) <= len(out) and out[len(out) - len(tail) :] == tail)

    def _verify_pass(self, items: list[_Item], on_early: EarlyCallback | None, start: float) -> list[Verdict | Exception]:
        # Under a grammar only the tokens it allows can be chosen: the heads compute just those.
        narrow = None
        if all(it.masks is not None for it in items):
            narrow = self.model.narrow_head(torch.cat([it.masks for it in items]))
        hooks = {}
        if on_early is not None and self.exits.layers:

            def at_exit(layer: int, hidden: torch.Tensor) -> None:
                for row, it in enumerate(items):
                    # An early verdict is a speculation signal only: one that cannot be made (or
                    # delivered) costs its own item that signal, never the pass or another item.
                    try:
                        k = len(it.tokens)
                        h = hidden[row, it.fed - k - 1 : it.fed]
                        logits = self.exits.logits(layer, h, narrow)
                        if it.masks is not None:
                            logits = apply_mask(logits, it.masks)
                        on_early(it.session, self._early_verdict(it, layer, logits))
                    except Exception as exc:
                        log.warning("no early verdict for session %s at layer %d: %r", it.session.session_id,
                                    layer, exc)

            hooks = {layer: at_exit for layer in self.exits.layers}
        with self._lock:
            for it in items:
                it.session.kv.append(it.tokens)
            try:
                all_logits = self.model.forward([it.session.kv for it in items], hooks=hooks, head=narrow)
            except Exception as exc:  # the pass itself failed: none of it is kept
                for it in items:
                    self._rollback(it)
                return [exc for _ in items]
            self.passes += 1
            self.largest_batch = max(self.largest_batch, len(items))
        elapsed = time.perf_counter() - start
        results: list[Verdict | Exception] = []
        for it, logits in zip(items, all_logits, strict=True):
            # Each item is decided and committed from its own logits rows, on its own session only.
            try:
                results.append(self._commit(it, self._decide(it, logits), elapsed))
            except Exception as exc:
                self._rollback(it)
                results.append(exc)
        return results

    def _decide(self, it: _Item, logits: torch.Tensor) -> rules.Outcome:
        k = len(it.tokens)
        logits = logits[-k - 1 :]
        if it.masks is not None:
            logits = apply_mask(logits, it.masks)
        settings = it.session.request.settings
        if settings.greedy:
            return rules.verify_greedy(logits, it.tokens)
        return rules.verify_sampling(logits, it.tokens, it.block.q, settings, it.session.generator)

    def _rollback(self, it: _Item) -> None:
        """Leave ``it``'s session as it was before this pass (its ids, output, grammar, generator, cache).

        Never raises: it runs while handling a failure, and must not turn one item's failure
        into the pass's.
        """
        sess = it.session
        try:
            sess.out.truncate(it.out_before)
            if it.rng_before is not None:
                sess.generator.set_state(it.rng_before)
            kv = sess.kv
            del kv.ids[it.ids_before :]
            if kv.cache is None:  # closed meanwhile: its cache is gone
                return
            kv.crop(it.cached_before)
            # A forward that failed half-way may have grown some layers in place past what
            # ``cached`` says; cut every layer back to it.
            for layer in kv.cache.layers:
                extra = layer.get_seq_length() - kv.cached
                if extra > 0:
                    layer.crop(-extra)
        except Exception:
            log.exception("could not restore session %s after its verification failed", sess.session_id)

    def _early_verdict(self, it: _Item, layer: int, logits: torch.Tensor) -> Verdict:
        # The exit's most likely outcome; confidence = the exit's probability of that whole
        # outcome (every accepted draft token and the next token), which is what a
        # preemptive block bets on.
        probs = torch.softmax(logits, dim=-1)
        outcome = rules.verify_greedy(logits, it.tokens)
        token = -1 if self._output_ends(it, outcome.accepted) else outcome.token
        chosen = list(it.tokens[: outcome.accepted]) + ([token] if token >= 0 else [])
        rows = torch.arange(len(chosen), device=probs.device)
        confidence = float(probs[rows, torch.tensor(chosen, dtype=torch.long, device=probs.device)].prod())
        return Verdict(
            it.block.round, VerdictKind.EARLY, outcome.accepted, token, confidence=confidence, exit_layer=layer
        )

    def _output_ends(self, it: _Item, accepted: int) -> bool:
        """Whether the output is complete after the first ``accepted`` draft tokens.

        A draft stops at EOS or at the grammar's end, and the target may accept that last
        token: then nothing follows it (no correction or bonus token).
        """
        if accepted and it.tokens[accepted - 1] in self.model.eos_token_ids:
            return True
        return it.masks is not None and not bool(it.masks[accepted].any())

    def _commit(self, it: _Item, outcome: rules.Outcome, elapsed: float) -> Verdict:
        sess = it.session
        sess.kv.truncate(it.ids_before + outcome.accepted)
        sess.out.extend(it.tokens[: outcome.accepted])
        token = -1 if self._output_ends(it, outcome.accepted) else outcome.token
        if token >= 0:
            sess.kv.append([token])
            sess.out.extend([token])
        forced = sess.out.append_forced()
        sess.kv.append(forced)
        sess.rounds += 1
        sess.last_used = time.monotonic()
        return Verdict(
            it.block.round, VerdictKind.FINAL, outcome.accepted, token, eos=sess.done, verify_time_s=elapsed
        )

    # ---- the cloud-autoregressive baseline -----------------------------------------------
    def generate(self, sess: TargetSession, max_new_tokens: int | None = None) -> Iterator[int]:
        """Generate on the target alone, one pass per token (the cloud-autoregressive baseline).

        Yields every output token of the session from the start (tokens the grammar forced
        at open first), each as soon as it is decided; same grammar and settings as
        verification. Use it on a fresh session.
        """
        limit = sess.out.max_new_tokens if max_new_tokens is None else min(max_new_tokens, sess.out.max_new_tokens)
        settings = sess.request.settings
        yield from list(sess.output)  # forced at open
        while not sess.done and len(sess.output) < limit:
            mask = sess.out.mask()
            with self._lock:
                logits = self.model.forward([sess.kv], head=self.model.narrow_head(mask))[0][-1]
            if mask is not None:
                logits = apply_mask(logits, mask)
            token, _ = rules.pick(logits, settings, sess.generator)
            sess.kv.append([token])
            sess.out.extend([token])
            yield token
            for t in sess.out.append_forced():
                sess.kv.append([t])
                yield t
