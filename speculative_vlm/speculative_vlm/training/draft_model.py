"""The draft architecture: a plain small LlamaForCausalLM on the target's vocabulary.

The draft must load with ``AutoModelForCausalLM.from_pretrained`` so the engine's generic
adapter uses it unchanged, and it must ship in the repository (at most 40 MB). The
vocabulary (49,152 x hidden) dominates its size, so the embedding is tied to the output
head and is not learnt from scratch: during training it is the target's own embedding
times a learnt projection (576 -> hidden, initialised with the embedding's principal
directions), which keeps the target's token geometry and trains 150k parameters instead of
12.6M; a step computes only the embedding rows it touches. :func:`materialise` folds the projection into an ordinary embedding matrix before
saving, so the checkpoint is a standard Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DraftShape:
    """Size of the draft; the defaults come to about 32 MB in fp16 with SmolLM2's vocabulary."""

    layers: int = 4
    hidden: int = 256
    intermediate: int = 768
    heads: int = 4
    kv_heads: int = 4
    max_positions: int = 2048


def draft_config(target_config, shape: DraftShape):
    """A LlamaConfig for the draft: the target's vocabulary, special tokens and RoPE base."""
    from transformers import LlamaConfig

    rope = getattr(target_config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
    return LlamaConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=target_config.rms_norm_eps,
        rope_parameters=dict(rope),
        tie_word_embeddings=True,
        bos_token_id=target_config.bos_token_id,
        eos_token_id=target_config.eos_token_id,
        pad_token_id=target_config.pad_token_id,
    )


class ProjectedDraft(nn.Module):
    """A Llama draft whose tied embedding is ``frozen target embedding @ learnt projection``."""

    def __init__(self, target_embedding: torch.Tensor, target_config, shape: DraftShape = DraftShape()):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.llama = LlamaForCausalLM(draft_config(target_config, shape))
        emb = target_embedding.detach().float()
        self.register_buffer("target_embedding", emb, persistent=False)
        # Principal directions of the target's embedding keep as much of its geometry as
        # `hidden` dimensions can; scaled so draft embeddings have the usual init magnitude.
        _, _, v = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
        proj = v[: shape.hidden].T.contiguous()
        scale = 0.02 / (emb @ proj).std().clamp_min(1e-8)
        self.projection = nn.Parameter(proj * scale)
        # The Llama's own embedding is replaced by the projection while training.
        self.llama.model.embed_tokens.weight.requires_grad_(False)

    def embedding(self) -> torch.Tensor:
        """The whole (vocab, hidden) embedding, as it will be saved."""
        return self.target_embedding @ self.projection

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of ``ids`` only; a training step needs a few thousand of 49,152."""
        return self.target_embedding[ids] @ self.projection

    def hidden_states(self, prefix: torch.Tensor, suffix: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, vocab: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states of the suffix tokens of a batch that shares one prefix.

        The shared prefix (the system prompt) runs once and its KV is repeated over the
        batch, as in generation, so a step costs the suffixes only. ``vocab`` is the sorted
        set of token ids that ``embedded`` holds the rows of.
        """
        cache = None
        if prefix.numel():
            out = self.llama.model(inputs_embeds=embedded[torch.searchsorted(vocab, prefix)][None], use_cache=True)
            cache = out.past_key_values
            cache.batch_repeat_interleave(suffix.shape[0])
        out = self.llama.model(inputs_embeds=embedded[torch.searchsorted(vocab, suffix)], attention_mask=attention_mask,
                               position_ids=position_ids, past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def materialise(self):
        """The standard LlamaForCausalLM with the projected embedding folded in (tied head)."""
        with torch.no_grad():
            self.llama.model.embed_tokens.weight.copy_(self.embedding())
        self.llama.tie_weights()
        return self.llama
