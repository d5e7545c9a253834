"""The LM head restricted to the tokens a grammar allows (models.RowsHead / forward(head=...)):
the same logits as masking the full head, computed for the allowed tokens only."""

from __future__ import annotations

import pytest
import torch
from speculative_vlm.decoding.exits import ExitHeads
from speculative_vlm.decoding.models import RowsHead, allowed_rows
from speculative_vlm.decoding.verifier import SessionRequest
from tiny_models import tiny_causal_lm, tiny_vlm


@pytest.mark.parametrize("make", [lambda: tiny_causal_lm("llama", seed=2), lambda: tiny_causal_lm("qwen2", seed=2),
                                  lambda: tiny_vlm(seed=2)], ids=["llama", "qwen2", "idefics3"])
def test_forward_with_rows_equals_the_full_head_masked_and_restores_the_head(make):
    adapter = make()
    request = SessionRequest(prompt="walk to the red ball")
    rows = torch.tensor([3, 17, 64, 65, adapter.vocab_size - 1])
    full_state, rows_state = adapter.start(adapter.encode(request)), adapter.start(adapter.encode(request))
    for s in (full_state, rows_state):
        s.append([5, 9, 11])
    full = adapter.forward([full_state])[0]
    narrow = adapter.forward([rows_state], head=RowsHead(adapter.lm_head, rows, adapter.vocab_size))[0]
    assert narrow.shape == full.shape
    assert torch.allclose(narrow[:, rows], full[:, rows], atol=1e-5)
    others = torch.ones(full.shape[-1], dtype=torch.bool)
    others[rows] = False
    assert torch.isneginf(narrow[:, others]).all()
    assert torch.equal(narrow.argmax(-1), rows[full[:, rows].argmax(-1)])
    # The model's own head is back in place afterwards.
    assert adapter.model.get_output_embeddings() is adapter.lm_head
    again = adapter.forward([full_state])[0]
    assert not torch.isneginf(again).any()


def test_exit_head_with_rows_matches_the_full_exit_head():
    adapter = tiny_causal_lm("llama", seed=4)
    heads = ExitHeads(adapter, [1])
    hidden = torch.randn(4, adapter.hidden_size)
    rows = torch.tensor([0, 7, 8, 100])
    narrow, full = heads.logits(1, hidden, RowsHead(adapter.lm_head, rows, adapter.vocab_size)), heads.logits(1, hidden)
    assert torch.allclose(narrow[:, rows], full[:, rows], atol=1e-5)
    assert torch.isneginf(narrow).sum() == 4 * (full.shape[-1] - 4)


def test_allowed_rows_is_the_union_of_the_masks():
    masks = torch.zeros((2, 3, 10), dtype=torch.bool)
    masks[0, 0, 2] = masks[1, 2, 7] = masks[0, 1, 2] = True
    assert allowed_rows(masks).tolist() == [2, 7]
    assert allowed_rows(None) is None
    head = torch.nn.Linear(4, 10, bias=True)
    out = RowsHead(head, torch.tensor([2, 7]), 10)(torch.randn(3, 4))
    assert torch.isfinite(out[:, [2, 7]]).all() and torch.isneginf(out[:, [0, 1, 3, 4, 5, 6, 8, 9]]).all()


def test_the_system_prompt_is_prefilled_once_and_reused_and_nothing_past_it():
    from speculative_vlm.commands.prompts import SYSTEM_PROMPT

    adapter = tiny_causal_lm("llama", seed=6)
    first = adapter.encode(SessionRequest(prompt="the red ball is 2 m ahead. walk to the red ball", system=SYSTEM_PROMPT))
    second = adapter.encode(SessionRequest(prompt="the red ball is 2 m ahead. turn left", system=SYSTEM_PROMPT))
    assert first.shared == second.shared > 100
    assert first.ids[: first.shared] == second.ids[: second.shared]
    adapter.start(first)
    assert adapter.prefill_reused == 0
    reused_state = adapter.start(second)
    assert adapter.prefill_reused == second.shared
    adapter.start(second)  # the same prompt again: still only the system part is reused
    assert adapter.prefill_reused == 2 * second.shared
    fresh = type(adapter)(adapter.model, adapter.tokenizer)  # an empty cache
    fresh_state = fresh.start(second)
    assert fresh.prefill_reused == 0
    for s in (reused_state, fresh_state):
        s.append([5, 9])
    assert torch.allclose(adapter.forward([reused_state])[0], fresh.forward([fresh_state])[0], atol=1e-4)
    # Another system prompt shares nothing.
    other = adapter.encode(SessionRequest(prompt="turn left", system="You drive a robot dog. Answer in JSON only, " * 4))
    adapter.start(other)
    assert adapter.prefill_reused == 2 * second.shared


def test_an_image_prompt_shares_what_comes_before_its_image_and_decodes_as_without_the_cache():
    from speculative_vlm.commands.prompts import SYSTEM_PROMPT
    from tiny_models import jpeg

    vlm = tiny_vlm(seed=3)
    first = vlm.encode(SessionRequest(prompt="walk to the red ball", image=jpeg((200, 30, 30)), system=SYSTEM_PROMPT))
    second = vlm.encode(SessionRequest(prompt="turn left", image=jpeg((30, 30, 200)), system=SYSTEM_PROMPT))
    image_token = vlm.model.config.image_token_id
    assert first.shared == second.shared == first.ids.index(image_token) > 100
    assert image_token not in first.ids[: first.shared]
    vlm.start(first)
    assert vlm.prefill_reused == 0
    reused_state = vlm.start(second)  # other pixels, the same system part
    assert vlm.prefill_reused == second.shared
    fresh = type(vlm)(vlm.model, vlm.tokenizer, processor=vlm.processor)  # an empty cache
    fresh_state = fresh.start(second)
    assert fresh.prefill_reused == 0
    for s in (reused_state, fresh_state):
        s.append([5, 9])
    reused, plain = vlm.forward([reused_state])[0], fresh.forward([fresh_state])[0]
    assert torch.allclose(reused, plain, atol=1e-4)
    # The pixels matter: the first prompt's image gives other logits after the same text.
    other_image = vlm.encode(SessionRequest(prompt="turn left", image=jpeg((200, 30, 30)), system=SYSTEM_PROMPT))
    other_state = vlm.start(other_image)
    other_state.append([5, 9])
    assert not torch.allclose(vlm.forward([other_state])[0], plain, atol=1e-4)
