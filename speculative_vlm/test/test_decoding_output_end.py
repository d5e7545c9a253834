"""When the draft's last token ends the output (EOS or the grammar's end) and the target
accepts it, nothing follows: no correction or bonus token, and no error."""

from __future__ import annotations

import copy

import pytest
from speculative_vlm.commands.schema import parse_command
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.models import ModelAdapter
from speculative_vlm.decoding.policy import FixedLength
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from tiny_models import tiny_causal_lm


def exact_copy(adapter: ModelAdapter) -> ModelAdapter:
    """A draft identical to the target: it drafts the grammar's last token and it is accepted."""
    return ModelAdapter(copy.deepcopy(adapter.model), adapter.tokenizer, name="exact-copy")


@pytest.mark.parametrize("exits", [(), (2,)])
def test_an_accepted_final_token_of_the_grammar_ends_the_output_cleanly(exits):
    target = tiny_causal_lm("llama", seed=3)
    request = SessionRequest("walk to the red ball", settings=GenerationSettings(max_new_tokens=80, grammar="command"))
    with InProcessVerifier(TargetEngine(target, exit_layers=list(exits))) as verifier:
        alone = list(verifier.engine.generate(verifier.engine.open_session(request)))
        result = SpeculativeDecoder(exact_copy(target), verifier, policy=FixedLength(8)).generate(request)
    assert result.token_ids == alone
    assert result.acceptance == 1.0  # the block with the grammar's end was accepted whole
    parse_command(result.text)
