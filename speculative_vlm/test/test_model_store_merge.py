"""The model store merges a shipped LoRA adapter once into a full model folder, found by name."""

import json
import os
import subprocess
import sys

import pytest
import torch
from speculative_vlm.decoding import model_store
from speculative_vlm.training import finetune, train_target
from tiny_models import tiny_causal_lm
from transformers import AutoModelForCausalLM


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty model store holding a tiny base, and a folder of shipped models with nothing in it."""
    base = tiny_causal_lm(layers=2)  # (its tokenizer comes from the real store, so before the swap)
    base.model.save_pretrained(tmp_path / "store" / "tiny-base")
    base.tokenizer.save_pretrained(tmp_path / "store" / "tiny-base")
    monkeypatch.setenv("SPECULATIVE_VLM_MODELS", str(tmp_path / "store"))
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(model_store, "bundled_dirs", lambda: [shipped])
    return tmp_path


def ship_adapter(store, seed: int = 0):
    """A LoRA adapter on tiny-base with non-zero weights (a fresh one is an exact no-op), as train-target saves it."""
    model = AutoModelForCausalLM.from_pretrained(store / "store" / "tiny-base")
    peft_model = finetune.add_lora(model, finetune.LoraSettings(rank=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    train_target.save_adapter(peft_model, store / "shipped" / model_store.ROBOT_ADAPTER, "tiny-base")
    return store / "shipped" / model_store.ROBOT_ADAPTER


def test_prepare_models_merges_the_shipped_adapter_and_resolve_finds_it(store):
    adapter = ship_adapter(store)
    merged = model_store.prepare_merged(model_store.ROBOT_TARGET)
    assert merged == store / "store" / model_store.ROBOT_TARGET
    assert model_store.resolve(model_store.ROBOT_TARGET) == merged
    expected = model_store.merge_adapter(adapter).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    base = AutoModelForCausalLM.from_pretrained(store / "store" / "tiny-base").state_dict()
    assert loaded.keys() == base.keys()  # a plain model: no LoRA tensors
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert not torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    assert json.loads((merged / model_store.MERGE_STAMP).read_text())["base"] == "tiny-base"


def test_prepare_models_is_idempotent_and_remerges_when_the_adapter_changes(store):
    ship_adapter(store, seed=0)
    merged = model_store.prepare_merged(model_store.ROBOT_TARGET)
    weights = merged / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert model_store.prepare_merged(model_store.ROBOT_TARGET) == merged
    assert weights.stat().st_mtime_ns == first  # nothing rewritten
    before = AutoModelForCausalLM.from_pretrained(merged).state_dict()["model.layers.0.mlp.up_proj.weight"]
    ship_adapter(store, seed=1)
    model_store.prepare_merged(model_store.ROBOT_TARGET)
    after = AutoModelForCausalLM.from_pretrained(merged).state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(before, after)
    assert not merged.with_name(merged.name + ".partial").exists()


def test_prepare_models_skips_the_robot_target_while_no_adapter_is_shipped(store, capsys):
    assert model_store.prepare_merged(model_store.ROBOT_TARGET) is None
    assert not (store / "store" / model_store.ROBOT_TARGET).exists()


def test_robot_target_without_a_shipped_adapter_is_not_found_with_a_hint_to_train_it(store):
    with pytest.raises(model_store.ModelNotFound, match="not shipped yet.*train-target.*prepare-models"):
        model_store.resolve(model_store.ROBOT_TARGET)


def test_robot_target_shipped_but_not_merged_is_not_found_with_a_hint_to_prepare(store):
    ship_adapter(store)
    with pytest.raises(model_store.ModelNotFound, match="run `speculative-vlm prepare-models`"):
        model_store.resolve(model_store.ROBOT_TARGET)


def test_the_merged_model_loads_where_peft_is_not_installed(store):
    ship_adapter(store)
    merged = model_store.prepare_merged(model_store.ROBOT_TARGET)
    code = ("import sys; sys.modules['peft'] = None\n"  # any import of peft fails
            "from speculative_vlm.decoding.models import load_model\n"
            f"m = load_model({str(merged)!r}); print(type(m.model).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("LlamaForCausalLM")


def test_shipped_models_are_found_without_a_ros_environment():
    """scripts/setup runs prepare-models before any ROS environment is sourced (AMENT_PREFIX_PATH unset)."""
    env = {k: v for k, v in os.environ.items() if k != "AMENT_PREFIX_PATH"}
    code = "from speculative_vlm.decoding.model_store import bundled_dirs; print([str(d) for d in bundled_dirs()])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "models" in out.stdout
