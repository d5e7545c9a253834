"""The real SmolLM2-135M-Instruct as target: speculative output is the target's own, token for token.

The command test uses the shipped distilled draft (``command-draft``, a 4-layer Llama on
SmolLM2's vocabulary) with the project's robot prompt; the free-text test uses a bf16
copy of the target as the draft (the distilled draft is weak outside commands).
"""

from __future__ import annotations

import pytest
import torch
from speculative_vlm.commands.prompts import SYSTEM_PROMPT, user_message
from speculative_vlm.commands.schema import parse_command
from speculative_vlm.decoding import model_store
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.models import load_model
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest

pytestmark = pytest.mark.slow
SHIPPED_DRAFT = "command-draft"


@pytest.fixture(scope="module")
def target():
    return load_model(model_store.SMOLLM2)


def test_smollm2_greedy_command_with_the_shipped_draft_and_early_exits_equals_target_alone():
    # The shipped pair: the trained target and the draft distilled from it, on a prompt as the robot sends it.
    target, draft = load_model(model_store.ROBOT_TARGET), load_model(SHIPPED_DRAFT)
    progress = "moved 0.0 m forward and 0.0 m to the left, turned 0 degrees; last command: none"
    request = SessionRequest(
        user_message("walk to the red ball", "red ball: about 2.0 m away, ahead, 10 degrees to the left.", progress),
        system=SYSTEM_PROMPT,
        settings=GenerationSettings(max_new_tokens=80, grammar="command"),
    )
    engine = TargetEngine(target, exit_layers=[24])
    alone = list(engine.generate(engine.open_session(request)))
    with InProcessVerifier(engine) as verifier:
        result = SpeculativeDecoder(draft, verifier, early_threshold=0.3).generate(request)
    assert result.token_ids == alone
    assert result.stop_reason == "eos"  # the grammar ended the command, not the budget
    parse_command(result.text)
    assert result.acceptance > 0.5  # the distilled draft accepts ~0.92 on held-out commands
    assert result.tokens_per_pass > 2


def test_smollm2_free_text_equals_hf_generate(target):
    draft = load_model(model_store.SMOLLM2, dtype=torch.bfloat16)
    request = SessionRequest("Name one colour.", settings=GenerationSettings(max_new_tokens=8))
    ids = target.encode(request).ids
    expected = target.model.generate(
        torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=list(target.eos_token_ids)
    )[0, len(ids) :].tolist()
    with InProcessVerifier(TargetEngine(target)) as verifier:
        result = SpeculativeDecoder(draft, verifier, preempt=False).generate(request)
    assert result.token_ids == expected
