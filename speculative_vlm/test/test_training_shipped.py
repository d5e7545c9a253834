"""The draft shipped in the repository: a standard HF causal LM on SmolLM2's vocabulary, small enough to ship."""

import json
from pathlib import Path

import pytest
import torch
from speculative_vlm.commands.grammar import compile_grammar
from speculative_vlm.commands.prompts import render_prompt
from speculative_vlm.commands.scene_text import describe_objects
from speculative_vlm.commands.schema import parse_command
from transformers import AutoModelForCausalLM, AutoTokenizer

SHIPPED_DRAFT = Path(__file__).resolve().parents[1] / "models" / "command-draft"


@pytest.fixture(scope="module")
def draft():
    return AutoModelForCausalLM.from_pretrained(SHIPPED_DRAFT, dtype=torch.float32).eval()


def test_the_shipped_folder_fits_in_40_mb():
    size = sum(f.stat().st_size for f in SHIPPED_DRAFT.iterdir() if f.is_file())
    assert size <= 40 * 1024 * 1024, f"{size / 2**20:.1f} MiB"


def test_the_shipped_draft_loads_as_a_causal_lm_on_smollm2s_vocabulary(draft):
    assert draft.config.vocab_size == 49152
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DRAFT)
    assert len(tokenizer) == 49152
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == draft.config.eos_token_id == 2


def test_the_card_states_the_recipe_and_the_measured_acceptance():
    card = (SHIPPED_DRAFT / "card.md").read_text()
    metrics = json.loads((SHIPPED_DRAFT / "metrics.json").read_text())
    for section in ("## Data recipe", "## Training", "## Acceptance against the target"):
        assert section in card
    assert f"acceptance {metrics['commands']['acceptance']:.3f} at 4 tokens/block" in card


def test_the_shipped_draft_writes_a_valid_command_under_the_grammar(draft):
    import xgrammar as xgr

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DRAFT)
    compiled = compile_grammar("command", tokenizer, draft.config.vocab_size, stop_token_ids=[2])
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, draft.config.vocab_size)
    prompt = render_prompt(tokenizer, "walk to the red ball", describe_objects([("red ball", 2.0, 0.5)]))
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    out, answer = None, []
    with torch.no_grad():
        for _ in range(48):
            feed = torch.tensor([answer[-1:] if out is not None else ids])
            out = draft(input_ids=feed, past_key_values=out.past_key_values if out else None, use_cache=True)
            logits = out.logits[:, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            answer.append(int(logits.argmax()))
            matcher.accept_token(answer[-1])
            if matcher.is_terminated():
                break
    command = parse_command(tokenizer.decode(answer[:-1]))
    assert command.action.value in {"move", "stop", "stand_up", "stand_down", "sit", "done"}
