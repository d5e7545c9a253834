"""The VLM target's model (training/vlm_model.py): Idefics3 on the text target, the draft's vocabulary, its prompt.

Tiny random models stand in for SmolLM2 and the vision tower (tiny_vlm_target.py); the checks are
about the architecture, the vocabulary and the prompt, which do not depend on size.
"""

from __future__ import annotations

import pytest
import torch
from speculative_vlm.commands.prompts import SYSTEM_PROMPT, user_message
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.models import ModelAdapter, load_model
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.training import train_vlm, vlm_model
from speculative_vlm.training.target_data import prompt_ids
from tiny_models import VOCAB, jpeg, noisy_copy, target_alone, tiny_causal_lm
from tiny_vlm_target import TINY_VISION, tiny_vlm_target
from transformers import AutoModelForImageTextToText, AutoProcessor


@pytest.fixture(scope="module")
def built():
    return tiny_vlm_target(seed=3)


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    vlm, processor, _ = built
    folder = tmp_path_factory.mktemp("vlm") / "tiny-vlm"
    vlm_model.save_vlm(vlm, processor, folder)
    return folder


def request(image: bytes | None = None, instruction: str = "walk to the red ball", grammar: str = "command",
            tokens: int = 24) -> SessionRequest:
    scene = "" if image is not None else "red ball: about 2.0 m away, ahead"
    return SessionRequest(prompt=user_message(instruction, scene, "moved 0.0 m forward and 0.0 m to the left"),
                          system=SYSTEM_PROMPT, image=image,
                          settings=GenerationSettings(max_new_tokens=tokens, grammar=grammar))


def test_the_saved_folder_loads_with_the_auto_classes_and_computes_the_same_logits(built, saved):
    vlm, processor, _ = built
    model = AutoModelForImageTextToText.from_pretrained(saved).eval()
    loaded = AutoProcessor.from_pretrained(saved)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(loaded).__name__ == "Idefics3Processor"
    prompt = ModelAdapter(vlm, processor.tokenizer, processor).encode(request(jpeg()))
    again = load_model(saved).encode(request(jpeg()))
    assert again.ids == prompt.ids
    with torch.inference_mode():
        ids = torch.tensor([prompt.ids])
        assert torch.allclose(vlm(input_ids=ids, **prompt.extra).logits[..., :VOCAB],
                              model(input_ids=ids, **again.extra).logits[..., :VOCAB], atol=1e-5)


def test_the_text_model_holds_the_backbones_weights_exactly(built):
    vlm, _, backbone = built
    text, mine = backbone.model.get_decoder().state_dict(), vlm.get_decoder().state_dict()
    for key, value in text.items():
        if key == "embed_tokens.weight":
            assert torch.equal(mine[key][:VOCAB], value)
        else:
            assert torch.equal(mine[key], value), key


def test_a_frame_is_16_image_tokens_at_the_default_size():
    assert vlm_model.VisionSettings().image_tokens == 16
    assert TINY_VISION.image_tokens == 4


def test_image_tokens_follow_the_backbones_ids_and_are_never_generated(built):
    vlm, processor, _ = built
    ids = vlm_model.image_token_ids(processor)
    assert sorted(ids) == list(range(VOCAB, VOCAB + 4))
    assert vlm.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert sorted(vlm.generation_config.suppress_tokens) == sorted(ids)


def test_the_adapter_outputs_exactly_the_drafts_vocabulary_and_pairs_with_a_text_draft(saved):
    target = load_model(saved)
    assert target.vocab_size == VOCAB and target.is_vlm
    assert target.model.get_input_embeddings().weight.shape[0] == VOCAB + 4  # the image tokens stay as inputs
    tiny_causal_lm(seed=4).check_pairs_with(target)  # a text draft: SmolLM2's tokenizer, 49,152 ids
    state = target.start(target.encode(request(jpeg())))
    assert target.forward([state])[0].shape[-1] == VOCAB  # no logit for an image token at all


def _boost_end_of_utterance(model, prompt) -> None:
    """Make <end_of_utterance> (an image token) the full head's best choice after ``prompt``."""
    with torch.inference_mode():
        hidden = model.model(input_ids=torch.tensor([prompt.ids]), **prompt.extra).last_hidden_state[0, -1]
    with torch.no_grad():
        model.get_input_embeddings().weight[VOCAB + 2] = 1e3 * hidden / hidden.norm()


def test_greedy_tokens_stay_in_the_drafts_vocabulary_even_where_an_image_token_scores_highest(saved):
    target = load_model(saved)
    r = request(jpeg(), grammar="", tokens=8)
    prompt = target.encode(r)
    _boost_end_of_utterance(target.model, prompt)
    full = AutoModelForImageTextToText.from_pretrained(saved).eval()
    _boost_end_of_utterance(full, prompt)
    with torch.inference_mode():
        logits = full(input_ids=torch.tensor([prompt.ids]), **prompt.extra).logits[0, -1]
    assert int(logits.argmax()) == VOCAB + 2  # what an uncut head would emit
    tokens = target_alone(TargetEngine(target), r)
    assert tokens and max(tokens) < VOCAB
    out = full.generate(input_ids=torch.tensor([prompt.ids]), **prompt.extra, max_new_tokens=4, do_sample=False)
    assert max(out[0, len(prompt.ids):].tolist()) < VOCAB  # plain generate honours suppress_tokens


def test_the_image_stands_on_the_scene_line_of_the_robots_prompt(saved):
    target = load_model(saved)
    text = target.tokenizer.decode(target.encode(request(jpeg())).ids)
    assert "\nScene: <fake_token_around_image><global-img>" + "<image>" * 4 + "<fake_token_around_image>\nProgress:" \
        in text
    assert text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)


def test_without_an_image_the_vlm_sees_the_text_targets_prompt_exactly(built, saved):
    _, _, backbone = built
    target = load_model(saved)
    scene = "red ball: about 2.0 m away, ahead"
    ids = target.encode(request(None)).ids
    assert ids == prompt_ids(backbone.tokenizer, "walk to the red ball", scene,
                             "moved 0.0 m forward and 0.0 m to the left")


def test_training_prompt_ids_are_the_ids_the_engine_encodes(saved):
    target = load_model(saved)
    progress = "moved 0.0 m forward and 0.0 m to the left"
    for instruction in ("walk to the red ball", "sit", "turn left 90 degrees"):
        ids = train_vlm.vlm_prompt_ids(target.processor, instruction, progress)
        assert ids == target.encode(request(jpeg(), instruction=instruction)).ids


@pytest.mark.parametrize("grammar", ["command", ""], ids=["command-grammar", "free-text"])
def test_speculative_greedy_with_the_vlm_target_and_a_text_draft_equals_the_vlm_target_alone(saved, grammar):
    target = load_model(saved)
    draft = noisy_copy(ModelAdapter(_text_part(target), target.tokenizer), noise=0.02)
    draft.check_pairs_with(target)
    engine = TargetEngine(target, exit_layers=[0])
    accepted = 0
    with InProcessVerifier(engine) as verifier:
        decoder = SpeculativeDecoder(draft, verifier, early_threshold=0.0)
        for i, colour in enumerate([(220, 30, 30), (30, 60, 220), (30, 180, 60)]):
            r = request(jpeg(colour), instruction=["walk to the red ball", "sit", "turn left"][i], grammar=grammar)
            result = decoder.generate(r)
            assert result.token_ids == target_alone(engine, r)
            assert max(result.token_ids) < VOCAB
            accepted += result.accepted
    assert accepted > 0


def _text_part(target: ModelAdapter):
    """A causal LM holding the VLM's text model and head (a text draft that agrees with it often)."""
    from transformers import AutoModelForCausalLM

    text_config = target.model.config.text_config
    lm = AutoModelForCausalLM.from_config(text_config)
    state = {f"model.{k}": v for k, v in target.model.get_decoder().state_dict().items()}
    lm.load_state_dict(state, strict=False)
    lm.resize_token_embeddings(VOCAB)
    return lm.eval()
