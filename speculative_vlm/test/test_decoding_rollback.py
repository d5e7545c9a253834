"""Rollback: after a rejection the caches are cropped, and the next logits equal a fresh run."""

from __future__ import annotations

import torch
from speculative_vlm.decoding.drafter import Drafter
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import DraftBlock, GenerationSettings, SessionRequest
from tiny_models import jpeg, noisy_copy, tiny_causal_lm, tiny_vlm


def fresh_last_logits(adapter, ids, extra=None) -> torch.Tensor:
    with torch.inference_mode():
        return adapter.model(input_ids=torch.tensor([ids]), **(extra or {})).logits[0, -1].float()


def test_target_logits_after_a_rejection_equal_a_fresh_recomputation():
    target = tiny_causal_lm("llama", seed=4)
    engine = TargetEngine(target)
    sess = engine.open_session(SessionRequest("walk to the red ball"))
    prompt_cache = sess.kv.cached
    verdict = engine.verify([(sess, DraftBlock(0, 0, (), (11, 12, 13, 14)))])[0]
    assert verdict.accepted < 4  # random tokens are rejected
    assert sess.kv.cached == prompt_cache + 1 + verdict.accepted  # cropped, prompt not recomputed
    incremental = target.forward([sess.kv])[0][-1]
    assert torch.allclose(incremental, fresh_last_logits(target, sess.kv.ids), atol=1e-4)


def test_vlm_logits_after_a_rejection_equal_a_fresh_recomputation_with_the_image():
    target = tiny_vlm(seed=2)
    request = SessionRequest("walk to the red ball", image=jpeg())
    engine = TargetEngine(target)
    sess = engine.open_session(request)
    engine.verify([(sess, DraftBlock(0, 0, (), (11, 12, 13)))])
    extra = target.encode(request).extra
    incremental = target.forward([sess.kv])[0][-1]
    assert torch.allclose(incremental, fresh_last_logits(target, sess.kv.ids, extra), atol=1e-4)


def test_draft_cache_after_sync_to_a_corrected_output_equals_a_fresh_recomputation():
    target = tiny_causal_lm("qwen2", seed=4)
    draft = noisy_copy(target, noise=0.05)
    drafter = Drafter(draft, SessionRequest("turn left", settings=GenerationSettings(max_new_tokens=32)))
    drafted = drafter.draft(6).tokens
    corrected = list(drafted[:2]) + [(drafted[2] + 1) % draft.vocab_size, 77]
    drafter.sync(corrected)
    assert drafter.tokens == corrected
    assert drafter.kv.cached <= drafter.kv.prompt_len + 2 + 1
    incremental = draft.forward([drafter.kv])[0][-1]
    assert torch.allclose(incremental, fresh_last_logits(draft, drafter.kv.ids), atol=1e-4)
