"""Early exits: verdicts come out mid-pass, and they never change the output."""

from __future__ import annotations

import torch
from hf_reference import hf_greedy
from speculative_vlm.decoding.exits import ExitAdapter, ExitHeads, load_exit_heads, save_exit_heads
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import DraftBlock, GenerationSettings, SessionRequest, VerdictKind
from tiny_models import noisy_copy, tiny_causal_lm


class AlwaysWrongExits(ExitHeads):
    """An exit that is sure, every time, of a token the target never outputs here."""

    def __init__(self, target, layers, wrong_token: int):
        super().__init__(target, layers)
        self.wrong_token = wrong_token
        self.vocab = target.vocab_size

    def logits(self, layer: int, hidden: torch.Tensor, narrow=None) -> torch.Tensor:
        out = torch.full(hidden.shape[:-1] + (self.vocab,), -1e4)
        out[..., self.wrong_token] = 1e4
        return out


def test_wrong_early_exits_leave_output_unchanged_and_every_preemptive_block_misses():
    target = tiny_causal_lm("llama", seed=5)
    draft = noisy_copy(target, noise=0.02)
    request = SessionRequest("walk to the red ball", settings=GenerationSettings(max_new_tokens=24))
    expected = hf_greedy(target, request)
    wrong = next(t for t in range(100, 200) if t not in expected)
    exits = AlwaysWrongExits(target, [1, 2], wrong)
    for pipeline in (False, True):
        with InProcessVerifier(TargetEngine(target, exit_layers=[1, 2], exit_heads=exits)) as verifier:
            result = SpeculativeDecoder(draft, verifier, pipeline=pipeline, early_threshold=0.9).generate(request)
        assert result.token_ids == expected
        preempted = [r for r in result.rounds if r.early in ("hit", "miss")]
        assert preempted and all(r.early == "miss" for r in preempted)
        assert result.early_hits == 0 and not any(r.preemptive for r in result.rounds)


def test_early_verdict_is_handed_out_before_the_later_layers_run():
    target = tiny_causal_lm("llama", seed=5)
    engine = TargetEngine(target, exit_layers=[1])
    sess = engine.open_session(SessionRequest("sit down"))
    events = []
    handle = target.decoder_layers[3].register_forward_hook(lambda *a: events.append("last layer"))
    try:
        verdicts = engine.verify(
            [(sess, DraftBlock(0, 0, (), (5, 6, 7)))], on_early=lambda s, v: events.append(v.kind)
        )
    finally:
        handle.remove()
    assert events == [VerdictKind.EARLY, "last layer"]
    assert verdicts[0].kind is VerdictKind.FINAL


def test_early_verdict_reports_layer_accepted_count_token_and_confidence():
    target = tiny_causal_lm("llama", seed=5)
    engine = TargetEngine(target, exit_layers=[2])
    sess = engine.open_session(SessionRequest("sit down"))
    early = []
    engine.verify([(sess, DraftBlock(3, 0, (), (5, 6)))], on_early=lambda s, v: early.append(v))
    (v,) = early
    assert (v.round, v.exit_layer) == (3, 2)
    assert 0 <= v.accepted <= 2 and 0 <= v.token < target.vocab_size and 0.0 < v.confidence <= 1.0


def test_an_untrained_exit_adapter_is_exactly_the_shared_head_and_survives_a_checkpoint(tmp_path):
    target = tiny_causal_lm("llama", seed=5)
    hidden = torch.randn(3, target.hidden_size)
    adapters = {1: ExitAdapter(target.hidden_size, 16)}
    heads = ExitHeads(target, [1], adapters)
    assert torch.allclose(heads.logits(1, hidden), ExitHeads(target, [1]).logits(1, hidden), atol=1e-5)
    with torch.no_grad():
        adapters[1].down.weight.normal_()
    path = save_exit_heads(heads, tmp_path / "exits.pt", target)
    loaded = load_exit_heads(path, target)
    assert loaded.layers == [1]
    assert torch.allclose(loaded.logits(1, hidden), heads.logits(1, hidden), atol=1e-5)
