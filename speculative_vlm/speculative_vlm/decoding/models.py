"""Hugging Face model adapters: prompt encoding, a KV cache per sequence, rollback, batching.

One :class:`ModelAdapter` wraps any ``AutoModelForCausalLM`` (text) or
``AutoModelForImageTextToText`` (Idefics3/SmolVLM; image + text) and gives the engine
four things: :meth:`~ModelAdapter.encode` turns a :class:`SessionRequest` into prompt ids
(with the chat template, and the image for a VLM), :meth:`~ModelAdapter.start` prefills a
:class:`KVState`, :meth:`~ModelAdapter.forward` runs the uncached tail of one or several
sequences in one pass (KV caches stacked with left padding, ragged inputs right-padded),
and :meth:`KVState.truncate` rolls a sequence back to a prefix without recomputing it.

The adapter runs where its model's weights are (:attr:`ModelAdapter.device`, ``.dtype``; see
:mod:`~speculative_vlm.decoding.placement` and :meth:`ModelAdapter.to`): every tensor it makes
(ids, attention masks, positions, pixel values, narrowed heads) is made on that device, and the
logits it returns are float32 on that device, so the rules decide in float32 whatever the
model's dtype.

A sequence's cache always holds a prefix of its ids; the tokens after it are fed on the
next pass. So rolling back after a rejection is a crop, and the prompt is computed once.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from speculative_vlm.decoding import model_store, placement
from speculative_vlm.decoding.verifier import (
    EmptyPrompt,
    ImageNotSupported,
    PromptTooLong,
    SessionRequest,
)


class VocabularyMismatch(ValueError):
    """A draft and a target that do not share an output vocabulary cannot be paired."""


@dataclass
class KVState:
    """One sequence on one model: its ids (prompt + output) and the cache of a prefix of them."""

    ids: list[int]
    prompt_len: int
    cache: DynamicCache = field(default_factory=DynamicCache)
    cached: int = 0  # leading ids whose keys/values are in the cache

    @property
    def output(self) -> list[int]:
        return self.ids[self.prompt_len :]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` ids; the cache is cropped, never recomputed."""
        if length < self.prompt_len:
            raise ValueError(f"cannot truncate into the prompt ({length} < {self.prompt_len})")
        del self.ids[length:]
        self.crop(length)

    def crop(self, length: int) -> None:
        """Drop cached keys/values beyond the first ``length`` ids."""
        if self.cached > length:
            # transformers 5 crops by a negative count of tokens to remove.
            self.cache.crop(length - self.cached)
            self.cached = length

    def append(self, tokens) -> None:
        self.ids.extend(int(t) for t in tokens)


@dataclass
class Prompt:
    ids: list[int]
    extra: dict  # model inputs for the prefill only (pixel_values, ...)
    shared: int = 0  # leading ids that do not depend on the user's message (system prompt, template)


# Layer hooks receive (layer index, hidden states (B, T, H)) during a forward pass.
LayerHook = "Callable[[int, torch.Tensor], None]"


class ModelAdapter:
    """A causal LM or VLM with a tokenizer (and processor), ready for speculative decoding."""

    def __init__(self, model, tokenizer, processor=None, name: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        text_config = model.config.get_text_config(decoder=True)
        self.is_vlm = processor is not None and getattr(model.config, "vision_config", None) is not None
        _cut_suppressed_tail(model)
        self.vocab_size: int = int(model.get_output_embeddings().weight.shape[0])
        self.num_layers: int = int(text_config.num_hidden_layers)
        self.max_context: int = int(getattr(text_config, "max_position_embeddings", 0) or 1 << 30)
        self.hidden_size: int = int(text_config.hidden_size)
        decoder = model.get_decoder()
        self.decoder_layers = decoder.layers
        self.final_norm = decoder.norm
        self.lm_head = model.get_output_embeddings()
        # Where the model keeps its LM head, so that forward(head=...) can stand a narrower one in.
        self._head_owner, self._head_attr = _owner_of(model, self.lm_head)
        self.eos_token_ids: tuple[int, ...] = _eos_ids(model, tokenizer)
        self.pad_token_id: int = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._prefix_cache = PrefixCache()
        self.prefill_reused = 0  # prompt ids whose keys/values came from the prefix cache

    # ---- placement -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model's weights are (and every tensor the adapter makes)."""
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its LM head's; logits are returned in float32)."""
        return self.lm_head.weight.dtype

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> ModelAdapter:
        """Move the model to ``device`` and ``dtype`` (None keeps the current one) after
        :func:`placement.check`; returns self. Sequences started before keep their old caches:
        start new ones."""
        target = placement.check(self.device if device is None else device, self.dtype if dtype is None else dtype)
        self.model.to(device=target.device, dtype=target.dtype)
        self._prefix_cache.clear()  # keys/values of the old placement
        return self

    # ---- prompts -------------------------------------------------------------------------
    def encode(self, request: SessionRequest) -> Prompt:
        """Prompt ids for a request (chat template applied); raises a typed Refused on bad input."""
        if not request.prompt or not request.prompt.strip():
            raise EmptyPrompt("empty_prompt", "the prompt is empty; send an instruction such as 'walk to the red ball'")
        if request.image is not None and not self.is_vlm:
            raise ImageNotSupported(
                "image_not_supported",
                f"model {self.name!r} is text-only; send no image, or use a vision-language target",
            )
        messages = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        if self.is_vlm and request.image is not None:
            messages.append(
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.prompt}]}
            )
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            image = _decode_image(request.image)
            inputs = self.processor(text=text, images=[image], return_tensors="pt")
            ids = inputs.pop("input_ids")[0].tolist()
            inputs.pop("attention_mask", None)
            extra = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                     for k, v in inputs.items()}
            # Everything before the first image token (the system prompt, the chat template, the
            # user turn's opening) is text the pixels never touch: shared like a text prompt's.
            image_token = getattr(self.model.config, "image_token_id", None)
            shared = ids.index(image_token) if image_token in ids else 0
        else:
            template_owner = self.processor if (self.is_vlm and self.processor.chat_template) else self.tokenizer

            def tokens(user_text: str) -> list[int]:
                content = [{"type": "text", "text": user_text}] if self.is_vlm else user_text
                text = template_owner.apply_chat_template(
                    [*messages, {"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
                return self.tokenizer(text, add_special_tokens=False)["input_ids"]

            ids = tokens(request.prompt)
            extra = {}
            # What any user message would share with this one: the system prompt and the template.
            shared = common_prefix([tokens("x"), ids])
        budget = self.max_context - request.settings.max_new_tokens
        if len(ids) > budget:
            raise PromptTooLong(
                "prompt_too_long",
                f"the prompt is {len(ids)} tokens but model {self.name!r} has room for {budget} "
                f"({self.max_context} context - {request.settings.max_new_tokens} new tokens); "
                "shorten the prompt or ask for fewer new tokens",
            )
        return Prompt(ids=list(ids), extra=extra, shared=shared)

    def decode(self, tokens) -> str:
        tokens = [t for t in tokens if t not in self.eos_token_ids]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---- sequences -----------------------------------------------------------------------
    def start(self, prompt: Prompt, chunk_tokens: int = 0) -> KVState:
        """Prefill all prompt ids but the last (it is fed with the first block).

        The part every prompt with the same system message shares (``prompt.shared`` ids:
        the system prompt and the chat template around it; robot commands share ~190 of
        ~230) is prefilled once and its keys/values reused. Nothing past it is ever reused,
        so an instruction sent twice costs the same both times. A prompt with an image shares
        what comes before its first image token. ``chunk_tokens`` > 0 runs the prefill that many ids
        at a time (see :class:`Prefill`, which a server steps itself between other work).
        """
        prefill = Prefill(self, prompt, chunk_tokens)
        while not prefill.done:
            prefill.step()
        return prefill.state

    @torch.inference_mode()
    def forward(
        self, states: list[KVState], hooks: dict[int, object] | None = None, head: RowsHead | None = None
    ) -> list[torch.Tensor]:
        """Feed each state's uncached ids in one pass; returns per state logits (n_i, V) in fp32.

        Several states are stacked: caches left-padded to a common length, inputs
        right-padded, with an attention mask and position ids per row, then split back.
        ``hooks`` maps a decoder layer index to ``fn(layer, hidden (B, T, H))``, called as
        soon as that layer has run (before the later layers). ``head`` (from
        :meth:`narrow_head`) computes the LM head for the tokens a grammar allows only and leaves
        every other logit at -inf: the same result as masking full logits, without the full
        head's cost (for SmolLM2 the 49,152-token head is a fifth of a pass; for a small draft,
        most of it).
        """
        for s in states:
            if s.cached >= len(s.ids):  # logits are needed for the last id: recompute it
                s.crop(len(s.ids) - 1)
        handles = []
        for layer, fn in (hooks or {}).items():
            handles.append(self.decoder_layers[layer].register_forward_hook(_hook(layer, fn)))
        if head is not None:
            setattr(self._head_owner, self._head_attr, head)
        try:
            if len(states) == 1:
                return [self._forward_one(states[0])]
            return self._forward_batch(states)
        finally:
            if head is not None:
                setattr(self._head_owner, self._head_attr, self.lm_head)
            for h in handles:
                h.remove()

    def _forward_one(self, s: KVState) -> torch.Tensor:
        new = s.ids[s.cached :]
        out = self.model(input_ids=torch.tensor([new], device=self.device), past_key_values=s.cache, use_cache=True)
        s.cached = len(s.ids)
        return out.logits[0].float()

    def _forward_batch(self, states: list[KVState]) -> list[torch.Tensor]:
        lens = [s.cached for s in states]
        news = [s.ids[s.cached :] for s in states]
        lmax, tmax = max(lens), max(len(n) for n in news)
        # Built as lists and copied to the device once each: row-by-row writes into a device
        # tensor would cost a copy (and on a GPU a kernel launch) per row.
        pairs = list(zip(lens, news, strict=True))
        input_ids = torch.tensor([new + [self.pad_token_id] * (tmax - len(new)) for _, new in pairs],
                                 dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (lmax - length) + [1] * (length + len(new)) + [0] * (tmax - len(new))
                             for length, new in pairs], dtype=torch.long, device=self.device)
        positions = torch.tensor([list(range(length, length + tmax)) for length, _ in pairs],
                                 dtype=torch.long, device=self.device)
        stacked = None
        if lmax > 0:
            per_layer = []
            for layer in range(len(states[0].cache.layers)):
                ks, vs = [], []
                for s, length in zip(states, lens, strict=True):
                    k, v = s.cache.layers[layer].keys, s.cache.layers[layer].values
                    pad = lmax - length
                    if pad:
                        zk = k.new_zeros(k.shape[:-2] + (pad, k.shape[-1]))
                        k, v = torch.cat([zk, k], -2), torch.cat([zk.new_zeros(v.shape[:-2] + (pad, v.shape[-1])), v], -2)
                    ks.append(k)
                    vs.append(v)
                per_layer.append((torch.cat(ks), torch.cat(vs)))
            stacked = DynamicCache(ddp_cache_data=per_layer)
        else:
            stacked = DynamicCache()
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=stacked, use_cache=True
        )
        logits = []
        for i, (s, length, new) in enumerate(zip(states, lens, news, strict=True)):
            rows = []
            for layer in stacked.layers:
                k = layer.keys[i : i + 1, :, lmax - length : lmax + len(new)]
                v = layer.values[i : i + 1, :, lmax - length : lmax + len(new)]
                rows.append((k.contiguous(), v.contiguous()))
            s.cache = DynamicCache(ddp_cache_data=rows)
            s.cached = len(s.ids)
            logits.append(out.logits[i, : len(new)].float())
        return logits

    # ---- exit heads ----------------------------------------------------------------------
    def narrow_head(self, masks: torch.Tensor | None) -> RowsHead | None:
        """The LM head for the tokens any of ``masks`` (..., V) allows; None without a grammar.

        Build it once per pass and hand it to :meth:`forward` and :meth:`head` (exits) alike.
        """
        return None if masks is None else RowsHead(self.lm_head, allowed_rows(masks), self.vocab_size)

    def head(self, hidden: torch.Tensor, narrow: RowsHead | None = None) -> torch.Tensor:
        """The shared final norm + LM head applied to a hidden state (the default exit head).

        With ``narrow`` (:meth:`narrow_head`), only its tokens' logits are computed; the others are -inf.
        """
        head = self.lm_head if narrow is None else narrow
        return head(self.final_norm(hidden.to(self.dtype))).float()

    def check_pairs_with(self, target: ModelAdapter) -> None:
        """Raise VocabularyMismatch unless this (draft) model emits the target's token ids."""
        if self.vocab_size != target.vocab_size:
            raise VocabularyMismatch(
                f"draft {self.name!r} has {self.vocab_size} output tokens but target {target.name!r} has "
                f"{target.vocab_size}; pick a draft trained on the target's tokenizer"
            )
        mine, theirs = self.tokenizer.get_vocab(), target.tokenizer.get_vocab()
        differing = [t for t, i in mine.items() if theirs.get(t, i) != i or t not in theirs]
        if differing:
            raise VocabularyMismatch(
                f"draft {self.name!r} and target {target.name!r} map {len(differing)} tokens differently "
                f"(e.g. {differing[:3]}); pick a draft trained on the target's tokenizer"
            )


class Prefill:
    """One prompt's prefill, run a chunk of at most ``chunk_tokens`` ids per :meth:`step` (0 = no limit).

    A server steps it between other sessions' verification passes, so that a long prompt
    delays them by one chunk at most; :meth:`ModelAdapter.start` runs it to the end. The
    shared part (``prompt.shared``) is one step when the prefix cache has it, and is
    computed up to exactly its end otherwise, so it can be cached. With an image, the first
    step past the shared part runs through the last image token whatever the chunk size: the
    vision features replace those tokens' embeddings in the one pass that carries the pixels.
    """

    def __init__(self, adapter: ModelAdapter, prompt: Prompt, chunk_tokens: int = 0):
        self.adapter = adapter
        self.prompt = prompt
        self.chunk_tokens = max(0, int(chunk_tokens))
        self.state = KVState(ids=list(prompt.ids), prompt_len=len(prompt.ids))
        self.end = max(0, len(prompt.ids) - 1)
        shared = min(prompt.shared, self.end)
        self.shared = shared if shared >= adapter._prefix_cache.min_shared else 0
        self.steps = 0
        self._pixels_fed = not prompt.extra

    @property
    def done(self) -> bool:
        return self.state.cached >= self.end

    @torch.inference_mode()
    def step(self) -> None:
        """Run the next chunk (no-op when done)."""
        s, ids = self.state, self.prompt.ids
        if self.done:
            return
        self.steps += 1
        if s.cached == 0 and self.shared:
            layers = self.adapter._prefix_cache.get(ids[: self.shared])
            if layers is not None:
                s.cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers])
                s.cached = self.shared
                self.adapter.prefill_reused += self.shared
                return
        stop = self.shared if s.cached < self.shared else self.end
        if self.chunk_tokens:
            stop = min(stop, s.cached + self.chunk_tokens)
        extra = {}
        if not self._pixels_fed and s.cached >= self.shared:  # the image tokens all come after the shared part
            extra, self._pixels_fed = self.prompt.extra, True
            stop = max(stop, self._after_last_image_token())
        self.adapter.model(input_ids=torch.tensor([ids[s.cached : stop]], device=self.adapter.device),
                           past_key_values=s.cache,
                           use_cache=True, logits_to_keep=1, **extra)
        s.cached = stop
        if self.shared and stop == self.shared:
            self.adapter._prefix_cache.put(ids[: self.shared], s.cache)

    def _after_last_image_token(self) -> int:
        image_token = getattr(self.adapter.model.config, "image_token_id", None)
        ids = self.prompt.ids[: self.end]
        if image_token is None:
            return self.end  # where the image goes is unknown: the whole prompt in one pass
        last = max((i for i, t in enumerate(ids) if t == image_token), default=-1)
        return last + 1


class PrefixCache:
    """Keys/values of the shared part of recent prompts (system prompt + template), LRU.

    ``min_shared`` keeps a bare chat template's few tokens from costing a copy for nothing.
    """

    def __init__(self, entries: int = 4, min_shared: int = 32):
        self.entries, self.min_shared = entries, min_shared
        self._items: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def get(self, ids: list[int]) -> list | None:
        with self._lock:
            layers = self._items.pop(tuple(ids), None)
            if layers is not None:
                self._items[tuple(ids)] = layers  # most recently used last
            return layers

    def put(self, ids: list[int], cache: DynamicCache) -> None:
        if self.entries <= 0:
            return
        layers = [(layer.keys[..., : len(ids), :].clone(), layer.values[..., : len(ids), :].clone())
                  for layer in cache.layers]
        with self._lock:
            self._items[tuple(ids)] = layers
            while len(self._items) > self.entries:
                self._items.pop(next(iter(self._items)))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that every sequence shares."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n


class RowsHead(torch.nn.Module):
    """An LM head computed for some tokens only; every other logit is -inf.

    It is made on the head's device in the head's dtype, wherever ``rows`` were computed
    (the grammar's masks come from the host).
    """

    def __init__(self, head: torch.nn.Linear, rows: torch.Tensor, vocab_size: int):
        super().__init__()
        self.rows = rows.to(device=head.weight.device, dtype=torch.long)
        self.weight = head.weight.index_select(0, self.rows)
        self.bias = head.bias.index_select(0, self.rows) if getattr(head, "bias", None) is not None else None
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.new_full(hidden.shape[:-1] + (self.vocab_size,), float("-inf"))
        out[..., self.rows] = torch.nn.functional.linear(hidden, self.weight, self.bias)
        return out


def allowed_rows(masks: torch.Tensor | None) -> torch.Tensor | None:
    """Token ids any of ``masks`` (..., V) allows (for :class:`RowsHead`); None without a grammar."""
    if masks is None:
        return None
    return masks.reshape(-1, masks.shape[-1]).any(0).nonzero().flatten()


def _owner_of(model, module) -> tuple[torch.nn.Module, str]:
    for name, m in model.named_modules():
        if m is module and name:
            parent, _, attr = name.rpartition(".")
            return (model.get_submodule(parent) if parent else model), attr
    raise ValueError(f"{type(model).__name__} does not hold its output embeddings as a submodule")


def _hook(layer: int, fn):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        fn(layer, hidden)

    return hook


def _cut_suppressed_tail(model) -> None:
    """Cut off the LM head the ids at its end that the model never generates (``suppress_tokens``).

    A VLM built on a text model's vocabulary appends its image tokens there (training/vlm_model.py):
    without those rows its output ids are exactly the text draft's. The cut head shares the weights.
    """
    head = model.get_output_embeddings()
    suppressed = set(getattr(getattr(model, "generation_config", None), "suppress_tokens", None) or ())
    rows = keep = int(head.weight.shape[0])
    while keep > 1 and keep - 1 in suppressed:
        keep -= 1
    if keep == rows or head.bias is not None:
        return
    cut = torch.nn.Linear(head.in_features, keep, bias=False, device="meta")
    cut.weight = torch.nn.Parameter(head.weight.detach()[:keep], requires_grad=False)
    model.set_output_embeddings(cut)


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is None:
            continue
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def _decode_image(data: bytes):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")
    except Exception as exc:  # PIL raises several types for undecodable bytes
        raise ImageNotSupported("bad_image", f"the image could not be decoded ({exc}); send a JPEG or PNG") from None


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None) -> ModelAdapter:
    """Load a model folder (or model-store name) as an adapter: a VLM when it has a vision config.

    ``dtype`` (float32, bfloat16, float16; default float32) and ``device`` (cpu, cuda, cuda:N;
    default cpu) are checked first (:func:`placement.check`: DeviceNotAvailable, DtypeNotSupported).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = placement.check(device, dtype)
    path = model_store.resolve(name_or_path)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=where.dtype).to(where.device)
        return ModelAdapter(model, processor.tokenizer, processor, name=str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=where.dtype).to(where.device)
    return ModelAdapter(model, tokenizer, name=str(name_or_path))


def describe(adapter: ModelAdapter) -> dict:
    """A small JSON-able summary (for logs and --json output)."""
    return json.loads(
        json.dumps(
            {
                "name": adapter.name,
                "vlm": adapter.is_vlm,
                "layers": adapter.num_layers,
                "vocab": adapter.vocab_size,
                "parameters": sum(p.numel() for p in adapter.model.parameters()),
                "device": str(adapter.device),
                "dtype": str(adapter.dtype).removeprefix("torch."),
                "path": str(Path(adapter.name)) if adapter.name else "",
            }
        )
    )
