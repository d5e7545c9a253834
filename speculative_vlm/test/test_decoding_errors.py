"""Bad input raises typed errors that say what to do."""

from __future__ import annotations

import pytest
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.models import VocabularyMismatch
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    EmptyPrompt,
    GenerationSettings,
    ImageNotSupported,
    PromptTooLong,
    Refused,
    SessionRequest,
)
from tiny_models import jpeg, tiny_causal_lm


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm("llama", seed=6, layers=2)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_refused(target, prompt):
    engine = TargetEngine(target)
    with pytest.raises(EmptyPrompt, match="prompt is empty"):
        engine.open_session(SessionRequest(prompt))


def test_prompt_longer_than_the_context_is_refused_with_the_numbers(target):
    engine = TargetEngine(target)
    long_prompt = "go left and then right " * 200  # ~1000 tokens; context is 512
    with pytest.raises(PromptTooLong, match="shorten the prompt") as err:
        engine.open_session(SessionRequest(long_prompt))
    assert err.value.code == "prompt_too_long" and "512" in str(err.value)


def test_image_to_a_text_only_target_is_refused(target):
    with pytest.raises(ImageNotSupported, match="text-only"):
        TargetEngine(target).open_session(SessionRequest("what is this", image=jpeg()))


def test_draft_with_a_different_vocabulary_cannot_be_paired(target):
    other = tiny_causal_lm("llama", seed=6, layers=1, vocab=32000)
    with InProcessVerifier(TargetEngine(target)) as verifier:
        with pytest.raises(VocabularyMismatch, match="tokenizer"):
            SpeculativeDecoder(other, verifier)


def test_unknown_grammar_is_refused(target):
    with pytest.raises(Refused, match="known grammars"):
        TargetEngine(target).open_session(SessionRequest("sit", settings=GenerationSettings(grammar="yaml")))


def test_bad_input_fails_in_the_loop_before_the_verifier_is_asked(target):
    with InProcessVerifier(TargetEngine(target)) as verifier:
        decoder = SpeculativeDecoder(target, verifier)
        with pytest.raises(EmptyPrompt):
            decoder.generate(SessionRequest(""))
        assert not verifier.engine.sessions
