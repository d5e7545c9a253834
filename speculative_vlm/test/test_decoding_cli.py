"""`speculative-vlm generate` on tiny models saved to disk: output, --check and --json."""

from __future__ import annotations

import json

from tiny_models import noisy_copy, tiny_causal_lm

from speculative_vlm import cli


def save(adapter, path):
    adapter.model.save_pretrained(path)
    adapter.tokenizer.save_pretrained(path)
    return str(path)


def test_generate_json_check_reports_identical_output_and_telemetry(tmp_path, capsys):
    target = tiny_causal_lm("llama", seed=12, layers=2)
    t = save(target, tmp_path / "target")
    d = save(noisy_copy(target, 0.02), tmp_path / "draft")
    code = cli.main(
        ["generate", "--target", t, "--draft", d, "--grammar", "command", "--exit-layers", "0",
         "--max-new-tokens", "36", "--check", "--json", "walk to the red ball"]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["check"]["identical"] is True
    assert out["verified"] and out["rounds"] == len(out["per_round"]) > 0
    assert {"acceptance", "tokens_per_target_pass", "early_hits", "early_misses", "wall_s"} <= set(out)
    assert out["text"].startswith('{"action":')


def test_generate_draft_only_is_marked_unverified(tmp_path, capsys):
    target = tiny_causal_lm("llama", seed=12, layers=2)
    t = save(target, tmp_path / "target")
    code = cli.main(["generate", "--target", t, "--draft", t, "--draft-only", "--json", "--max-new-tokens", "6", "hi"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["verified"] is False and out["tokens"] == 6
