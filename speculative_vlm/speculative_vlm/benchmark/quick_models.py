"""Tiny random models for ``speculative-vlm bench --quick``: a 4-layer target and a noisy copy as its draft.

They share SmolLM2's real tokenizer and run the command grammar, so the quick run goes
through every code path of the full one in seconds. Their answers are arbitrary and their
timings mean nothing; they exist so the benchmark code cannot rot.
"""

from __future__ import annotations

from pathlib import Path


def build(folder: Path, seed: int = 9) -> tuple[str, str]:
    """Write ``folder/target`` and ``folder/draft``; returns their paths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from speculative_vlm.decoding import model_store

    tokenizer = AutoTokenizer.from_pretrained(model_store.resolve(model_store.SMOLLM2))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        initializer_range=0.2,  # peaked logits: greedy choices are not near-ties
    )
    torch.manual_seed(seed)
    target = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    draft.load_state_dict(target.state_dict())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a noisy copy: often right, sometimes not, so both verdict paths run
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.03 * float(p.std() if p.numel() > 1 else 1.0))
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        path = folder / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]
