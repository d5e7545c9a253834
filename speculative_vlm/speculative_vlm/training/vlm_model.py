"""The VLM target: Idefics3 (the SmolVLM architecture) with a small vision tower on the SmolLM2 text target.

No VLM with weights can be had offline, so this builds one from parts: transformers'
``Idefics3ForConditionalGeneration`` with a vision tower trained from scratch (a SigLIP-style
encoder: 128 px images, 16 px patches, 4 layers of width 192, about 1.9M parameters), the
pixel-shuffle connector (scale factor 2: the 64 patches become 16 image tokens, projected to the
backbone's width, 0.44M parameters) and a language backbone that starts as the text target
(``smollm2-135m-robot``, the instruction-following SmolLM2 of ``train-target``; the stock
``smollm2-135m-instruct`` for tests and development). Saved, the folder loads with
``AutoModelForImageTextToText`` and ``AutoProcessor`` like any SmolVLM, so a larger pretrained VLM
drops in on a GPU without code changes.

**The vocabulary.** Idefics3's processor needs four special tokens (``<fake_token_around_image>``,
``<image>``, ``<end_of_utterance>``, ``<global-img>``). They are appended after the backbone's
49,152 ids, so every text id keeps its meaning, and the generation config lists them in
``suppress_tokens``: they are input-only. :class:`~speculative_vlm.decoding.models.ModelAdapter`
cuts suppressed ids at the end of a head off it, so the VLM target's output vocabulary is exactly
the text draft's 49,152 ids (``check_pairs_with`` passes and every generated id means the same
to both); plain ``generate`` honours ``suppress_tokens`` the same way.

**The prompt.** The robot's own prompt (:mod:`speculative_vlm.commands.prompts`) with the image
where the scene text goes: the chat template is SmolLM2's (a prompt without an image renders to
the very same text), and a user turn holding one image and a ``Scene:`` line gets the image there
(``Scene: <image>``), so the backbone reads the scene where it learnt to. Other layouts put the
images before the text, as SmolVLM's template does.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")

# SmolLM2's chat template, extended to content lists with images (see the module docstring).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set parts = namespace(text='', images=0) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set parts.images = parts.images + 1 -%}"
    "{%- else -%}{%- set parts.text = parts.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if parts.images == 1 and '\\nScene: ' in parts.text -%}"
    "{%- set text = parts.text.replace('\\nScene: ', '\\nScene: <image>', 1) -%}"
    "{%- else -%}{%- set text = '<image>' * parts.images + parts.text -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class VisionSettings:
    """The vision tower and connector. The defaults keep a frame at 16 image tokens (a cheap prefill)."""

    image_size: int = 128  # px, square (the processor resizes every frame to it)
    patch_size: int = 16
    layers: int = 4
    hidden: int = 192
    heads: int = 3
    intermediate: int = 768
    scale_factor: int = 2  # pixel shuffle: (image_size / patch_size)^2 / scale_factor^2 image tokens

    @property
    def image_tokens(self) -> int:
        """Image tokens per frame (the ``<image>`` placeholders the processor writes)."""
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2

    def vision_config(self) -> dict:
        return {"hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "image_size": self.image_size, "patch_size": self.patch_size}


def vlm_tokenizer(tokenizer):
    """A copy of the backbone's tokenizer with the image tokens appended after its ids (see the docstring)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)}, replace_extra_special_tokens=False)
    ids = tok.convert_tokens_to_ids(list(IMAGE_TOKENS))
    if min(ids) < len(tokenizer):
        raise ValueError(f"the backbone's tokenizer already holds image tokens at {ids}; give a text-only backbone")
    return tok


def make_processor(tokenizer, settings: VisionSettings = VisionSettings()):
    """The Idefics3 processor: no image splitting, every frame resized to ``settings.image_size`` square."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    size = {"longest_edge": settings.image_size}
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size=size, max_image_size=size)
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                             image_seq_len=settings.image_tokens, chat_template=CHAT_TEMPLATE)


def build_vlm(backbone, tokenizer, settings: VisionSettings = VisionSettings(), seed: int = 0):
    """A new VLM on ``backbone`` (a causal LM, e.g. the text target) and its processor.

    The text model holds the backbone's weights exactly; the image tokens' embedding rows start as the
    mean of the backbone's; the vision tower and connector are new (seeded by ``seed``).
    Returns ``(Idefics3ForConditionalGeneration, Idefics3Processor)``.
    """
    from transformers import GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration

    from speculative_vlm.decoding.model_store import load_text_weights

    tok = vlm_tokenizer(tokenizer)
    text = backbone.config.to_dict()
    text["vocab_size"] = len(tok)
    image_ids = tok.convert_tokens_to_ids(list(IMAGE_TOKENS))
    config = Idefics3Config(
        text_config=text, vision_config=settings.vision_config(), scale_factor=settings.scale_factor,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=bool(backbone.config.tie_word_embeddings),
    )
    config.vision_settings = asdict(settings)  # what train-target --vision chose, for the record
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).float()
    embeddings = backbone.get_input_embeddings().weight.detach()
    load_text_weights(model, backbone, embeddings.mean(0, keepdim=True).expand(len(image_ids), -1))
    generation = GenerationConfig.from_model_config(backbone.config)
    if getattr(backbone, "generation_config", None) is not None:
        generation = copy.deepcopy(backbone.generation_config)
    generation.suppress_tokens = sorted(image_ids)
    model.generation_config = generation
    return model.eval(), make_processor(tok, settings)


def save_vlm(model, processor, folder: Path) -> None:
    """The VLM as a model folder (weights, config, processor) that ``AutoModelForImageTextToText`` loads."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def image_token_ids(processor) -> list[int]:
    """The ids of the image tokens in the processor's tokenizer."""
    return processor.tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))


def vision_parameters(model) -> dict[str, int]:
    """Parameter counts of the parts (vision tower, connector, text model)."""
    inner = model.model
    return {name: sum(p.numel() for p in part.parameters())
            for name, part in (("vision", inner.vision_model), ("connector", inner.connector),
                               ("text", inner.text_model))}
