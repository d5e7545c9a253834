"""The reference every lossless test compares with: the target alone, greedy, through Hugging Face's own
``generate`` on the prompt the engine encodes (images included)."""

from __future__ import annotations

import torch
from speculative_vlm.decoding.verifier import SessionRequest


def hf_greedy(adapter, request: SessionRequest) -> list[int]:
    prompt = adapter.encode(request)
    out = adapter.model.generate(
        input_ids=torch.tensor([prompt.ids]),
        **prompt.extra,
        max_new_tokens=request.settings.max_new_tokens,
        do_sample=False,
        eos_token_id=list(adapter.eos_token_ids),
        pad_token_id=adapter.pad_token_id,
    )
    return out[0, len(prompt.ids) :].tolist()
