"""Tiny random models for tests: built from a config in ~0.1 s, SmolLM2's real tokenizer.

Right for exactness tests (speculative output == target output), meaningless for quality.
A *draft* for a tiny target is a noisy copy of it, so drafts are often but not always
accepted and both the accept and the reject paths run.
"""

from __future__ import annotations

import copy
import functools
import io

import torch
from speculative_vlm.decoding import model_store
from speculative_vlm.decoding.models import ModelAdapter

VOCAB = 49152


@functools.cache
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_store.resolve(model_store.SMOLLM2))


def _text_config(arch: str, vocab: int, layers: int, hidden: int = 64):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    tok = smollm2_tokenizer()
    return cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )


def tiny_causal_lm(arch: str = "llama", seed: int = 0, layers: int = 4, vocab: int = VOCAB) -> ModelAdapter:
    """A random causal LM (``llama`` or ``qwen2``) with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _text_config(arch, vocab, layers)
    # A larger init than the default makes logits peaked, so greedy choices are not near-ties.
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # With another vocab size the tokenizer is still SmolLM2's: only the size is compared first.
    return ModelAdapter(model, smollm2_tokenizer(), name=f"tiny-{arch}-{seed}")


def noisy_copy(adapter: ModelAdapter, noise: float = 0.02, seed: int = 1) -> ModelAdapter:
    """A draft for ``adapter``: the same weights plus Gaussian noise (relative to each tensor's std)."""
    model = copy.deepcopy(adapter.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * float(p.std() if p.numel() > 1 else 1.0))
    return ModelAdapter(model, adapter.tokenizer, adapter.processor, name=adapter.name + "-draft")


def tiny_pair(seed: int = 0, noise: float = 0.05, draft_seed: int = 1, arch: str = "llama",
              layers: int = 4) -> tuple[ModelAdapter, ModelAdapter]:
    """A tiny target (:func:`tiny_causal_lm`) and a noisy-copy draft for it (:func:`noisy_copy`):
    the verifier's model and the robot's."""
    target = tiny_causal_lm(arch, seed=seed, layers=layers)
    return target, noisy_copy(target, noise=noise, seed=draft_seed)


def target_alone(engine, request) -> list[int]:
    """The target's own output for ``request`` (what every speculative run must reproduce)."""
    session = engine.open_session(request)
    try:
        return list(engine.generate(session))
    finally:
        engine.close_session(session)


def truncated_copy(adapter: ModelAdapter, layers: int) -> ModelAdapter:
    """A draft made of the first ``layers`` decoder layers of ``adapter`` (shared final norm and head)."""
    model = copy.deepcopy(adapter.model)
    decoder = model.get_decoder()
    decoder.layers = decoder.layers[:layers]
    model.config.get_text_config(decoder=True).num_hidden_layers = layers
    return ModelAdapter(model, adapter.tokenizer, adapter.processor, name=f"{adapter.name}-first{layers}")


VLM_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
VLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@functools.cache
def _vlm_tokenizer():
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": VLM_TOKENS})
    return tok


def vlm_vocab() -> int:
    return len(_vlm_tokenizer())


def tiny_vlm(seed: int = 0, layers: int = 4) -> ModelAdapter:
    """A random Idefics3 (SmolVLM architecture): 32x32 images, 4 image tokens each."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tok = _vlm_tokenizer()
    torch.manual_seed(seed)
    text = _text_config("llama", len(tok), layers)
    text.initializer_range = 0.2
    config = Idefics3Config(
        text_config=text.to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vocab_size=len(tok),
        tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=VLM_TEMPLATE
    )
    return ModelAdapter(model, tok, processor, name=f"tiny-idefics3-{seed}")


def tiny_vlm_text_draft(seed: int = 5, layers: int = 2) -> ModelAdapter:
    """A text-only llama draft sharing the tiny VLM's vocabulary."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _text_config("llama", vlm_vocab(), layers)
    config.initializer_range = 0.2
    return ModelAdapter(AutoModelForCausalLM.from_config(config), _vlm_tokenizer(), name="tiny-vlm-draft")


def jpeg(color=(200, 30, 30), size=(48, 40)) -> bytes:
    """A small solid-colour JPEG with a square, as a camera frame stand-in."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (90, 90, 90))
    ImageDraw.Draw(image).rectangle([10, 10, 30, 30], fill=color)
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def slow_down(adapter: ModelAdapter, seconds_per_token: float) -> ModelAdapter:
    """Make every forward pass of ``adapter`` take ``seconds_per_token`` per token fed, as a big model would.

    The resource tests need passes whose cost grows with the tokens fed (a long prefill
    must be long) without a big model's CPU time; the sleep releases the GIL like a real
    forward pass does. The outputs are unchanged.
    """
    import time

    def pause(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        time.sleep(seconds_per_token * hidden.shape[0] * hidden.shape[1])

    adapter.decoder_layers[0].register_forward_pre_hook(pause, with_kwargs=True)
    return adapter
