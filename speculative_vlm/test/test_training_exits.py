"""Self-distilled exit adapters learn to agree with the final layer on the target's own text.

(A tiny random model has little that generalises to held-out prompts, so this checks the
fit on the training text; held-out agreement for SmolLM2 is in the engine's report.)"""

from __future__ import annotations

from speculative_vlm.decoding.exits import save_exit_heads
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.train_exits import train_exits
from speculative_vlm.decoding.verifier import DraftBlock, SessionRequest
from tiny_models import tiny_causal_lm


def test_training_raises_agreement_with_the_final_layer_and_the_checkpoint_serves_early_verdicts(tmp_path):
    target = tiny_causal_lm("llama", seed=9)
    heads, report = train_exits(
        target, [1, 2], train_prompts=6, heldout_prompts=2, steps=60, grammar="", max_new_tokens=12, log=lambda *_: None
    )
    for layer in ("1", "2"):
        assert report["train_agreement_after"][layer] > report["train_agreement_before"][layer] + 0.1
        assert 0.0 <= report["agreement_after"][layer] <= 1.0
    path = save_exit_heads(heads, tmp_path / "exits.pt", target, report)
    engine = TargetEngine(target, exit_layers=[2], exit_heads=path)
    assert engine.exits.trained and engine.exit_layers == [2]
    sess = engine.open_session(SessionRequest("sit down"))
    early = []
    engine.verify([(sess, DraftBlock(0, 0, (), (5, 6)))], on_early=lambda s, v: early.append(v))
    assert [v.exit_layer for v in early] == [2]
