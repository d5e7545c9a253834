"""`speculative-vlm train-target --vision`: teach the VLM target to act from the camera frame; ship its delta.

The VLM (:mod:`.vlm_model`: Idefics3 with a small vision tower on the text target) is trained by
behaviour cloning of the scripted expert, as the text target is, on the same train-split rollouts
(:mod:`.target_data`), but its prompt has the camera frame where the text target's has the scene
text: the robot's own prompt, pixels alone (no ground truth, no describer text). Every step's frame
is rendered again from the pose the robot stood at, with a new look each time it is used
(:mod:`.vlm_frames`: room colours and tiling, light, noise, blur, JPEG quality, occluders and
distractors that exist only in the picture), so an epoch never repeats a picture.

What trains: the vision tower and the connector (new, from scratch) and a LoRA on the backbone's
attention and MLP projections (``--rank``; 0 freezes the backbone). The backbone was taught to read
the scene from words on its ``Scene:`` line; the LoRA lets it learn to read the 16 image tokens that
stand there now instead of asking the connector to imitate word embeddings, for about a quarter
more time per example (the system prompt's keys and values then have to be recomputed for every
batch: with a frozen backbone they are computed once). The loss is cross-entropy on the answer
tokens only, over the 49,152 ids the model may output.

What ships (``speculative_vlm/models/command-target-vlm``, fp16): the vision tower, the connector,
the image tokens' embedding rows, the LoRA, the VLM's config and processor, ``vlm-delta.json`` (the
backbone it is a delta on, with that backbone's stamp), ``card.md``, ``train-log.txt`` and
``metrics.json``. ``speculative-vlm prepare-models`` merges it into the store as ``smolvlm-robot``
(:func:`speculative_vlm.decoding.model_store.merge_vlm_delta`). The card's numbers are measured on
that merged model, against the text target reading the describer's scene text, on the held-out
split only.
"""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from speculative_vlm.commands.prompts import SYSTEM_PROMPT, user_message
from speculative_vlm.decoding.model_store import (
    IMAGE_ROWS_KEY,
    VLM_CONFIG_FILE,
    VLM_DELTA,
    VLM_DELTA_FILE,
    VLM_TARGET,
    VLM_WEIGHTS_FILE,
)
from speculative_vlm.decoding.models import common_prefix
from speculative_vlm.training.target_data import FrameExample
from speculative_vlm.training.vlm_frames import PLAIN, Variation, random_look, render_frame
from speculative_vlm.training.vlm_model import VisionSettings

if TYPE_CHECKING:
    from speculative_vlm.training.train_target import TrainTargetOptions

SHIPPED_DELTA = Path(__file__).resolve().parents[2] / "models" / VLM_DELTA
TEXT_PROJECTIONS = r"model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

# Options whose default differs with --vision: name -> (text target's, VLM target's).
MODE_DEFAULTS: dict[str, tuple] = {
    # Both finish their schedule inside the time cap at the pace measured here (bfloat16 autocast): the text
    # target's steps took 0.67 s per example in a full run (11,255 examples), the VLM's 0.58 (11,397 rows).
    "epochs": (0.6, 0.8),
    "lr": (1e-3, 1e-3),
    "warmup_steps": (20, 40),
    "rank": (16, 8),
    "alpha": (32, 16),
    "minutes": (76.0, 95.0),
    "probe": (32, 32),
    "probe_every": (150, 250),
}


def resolve_mode_defaults(args: TrainTargetOptions) -> None:
    """Fill the options left at None with the text target's or the VLM's default."""
    for name, (text, vision) in MODE_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, vision if getattr(args, "vision", False) else text)


# ---- prompts and batches ---------------------------------------------------------------------------------
def vlm_prompt_ids(processor, instruction: str, progress: str, system_prompt: str = SYSTEM_PROMPT) -> list[int]:
    """The prompt's ids as the engine encodes the robot's request with an image (the scene line left to it)."""
    from PIL import Image

    messages = [{"role": "system", "content": system_prompt},
                {"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": user_message(instruction, "", progress)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    size = processor.image_processor.size["longest_edge"]
    return list(processor(text=text, images=[Image.new("RGB", (size, size))])["input_ids"][0])


@dataclass(frozen=True)
class FrameTokens:
    """A training example of the VLM: prompt ids (with the image tokens), answer ids and what the frame shows."""

    family: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    frame: FrameExample


def tokenize_frames(frames: Sequence[FrameExample], processor, stop_id: int,
                    system_prompt: str = SYSTEM_PROMPT) -> list[FrameTokens]:
    tokenizer = processor.tokenizer
    prompts: dict[tuple[str, str], tuple[int, ...]] = {}
    out = []
    for f in frames:
        e = f.example
        key = (e.instruction, e.progress)
        if key not in prompts:
            prompts[key] = tuple(vlm_prompt_ids(processor, e.instruction, e.progress, system_prompt))
        out.append(FrameTokens(e.family, prompts[key],
                               (*tokenizer(e.answer, add_special_tokens=False)["input_ids"], stop_id), f))
    return out


def pixels(processor, jpegs: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """``pixel_values`` and ``pixel_attention_mask`` of frames, as the processor makes them for the engine."""
    from PIL import Image

    images = [[Image.open(io.BytesIO(j)).convert("RGB")] for j in jpegs]  # one image per example
    out = processor.image_processor(images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]}


@dataclass
class FrameBatch:
    prefix: torch.Tensor  # (P,) ids every example starts with (never past the image)
    suffix: torch.Tensor  # (B, T) the rest of each prompt (its image tokens) and its answer, right-padded
    positions: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (N,) batch row of each answer token
    cols: torch.Tensor  # (N,) suffix position whose output predicts it
    targets: torch.Tensor  # (N,)
    images: dict[str, torch.Tensor]


def first_image_token(processor) -> int:
    """The id that opens an image in a prompt (Idefics3's ``<fake_token_around_image>``)."""
    return processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")


def collate_frames(examples: Sequence[FrameTokens], jpegs: Sequence[bytes], processor, pad_id: int) -> FrameBatch:
    """As :func:`speculative_vlm.training.finetune.collate`, with the frames' pixels; the shared prefix stops
    before the first image token, so the image tokens are always fed with their pixels."""
    first_image = first_image_token(processor)
    seqs = [list(e.prompt_ids) + list(e.answer_ids) for e in examples]
    shared = min(common_prefix([e.prompt_ids for e in examples]),
                 min(e.prompt_ids.index(first_image) for e in examples))
    width = max(len(s) for s in seqs) - shared
    suffix = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, (e, s) in enumerate(zip(examples, seqs, strict=True)):
        suffix[r, : len(s) - shared] = torch.tensor(s[shared:])
        start = len(e.prompt_ids) - 1 - shared
        rows.extend([r] * len(e.answer_ids))
        cols.extend(range(start, start + len(e.answer_ids)))
        targets.extend(e.answer_ids)
    positions = torch.arange(shared, shared + width).expand(len(seqs), width)
    return FrameBatch(torch.tensor(seqs[0][:shared], dtype=torch.long), suffix, positions, torch.tensor(rows),
                      torch.tensor(cols), torch.tensor(targets), pixels(processor, jpegs))


def frame_batch_loss(model, batch: FrameBatch, vocab: int) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over the answer tokens (logits over the first ``vocab`` ids only), and accuracy."""
    losses, accuracy = answer_token_losses(model, batch, vocab)
    return losses.mean(), accuracy


def answer_token_losses(model, batch: FrameBatch, vocab: int) -> tuple[torch.Tensor, float]:
    """Cross-entropy of each answer token (in ``batch.rows`` order; logits over the first ``vocab`` ids only),
    and the accuracy over them all.

    The shared prefix runs once per batch (without gradients when no text weight trains).
    """
    vlm = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = vlm.model
    cache = None
    if batch.prefix.numel():
        text_trains = any(p.requires_grad for p in inner.text_model.parameters())
        with torch.set_grad_enabled(text_trains and torch.is_grad_enabled()):
            cache = inner.text_model(input_ids=batch.prefix[None], use_cache=True).past_key_values
        cache.batch_repeat_interleave(batch.suffix.shape[0])
    hidden = inner(input_ids=batch.suffix, position_ids=batch.positions, past_key_values=cache, use_cache=True,
                   **batch.images).last_hidden_state
    head = vlm.get_output_embeddings().weight[:vocab]
    logits = torch.nn.functional.linear(hidden[batch.rows, batch.cols], head).float()
    losses = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
    return losses, (logits.argmax(-1) == batch.targets).float().mean().item()


CAPTION_REQUEST = "Describe the camera frame."


def caption_prompt_ids(processor, system_prompt: str = SYSTEM_PROMPT) -> list[int]:
    """The prompt of the caption task: the robot's system prompt, then the frame and :data:`CAPTION_REQUEST`
    (no ``Instruction:`` line, so no robot request reads like it); its answer is the frame's scene text."""
    from PIL import Image

    messages = [{"role": "system", "content": system_prompt},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_REQUEST}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    size = processor.image_processor.size["longest_edge"]
    return list(processor(text=text, images=[Image.new("RGB", (size, size))])["input_ids"][0])


class FrameSteps:
    """``fit``'s step loss for the VLM: each example's frame rendered with a look seeded by (seed, step, row).

    With ``caption`` > 0, that share of the rows (drawn from the same seed) asks instead for the frame's
    description (:func:`caption_prompt_ids`) and is answered with what the scene describer reads in the very
    frame rendered: about 25 tokens that all depend on the pixels (colours, shapes, distances, bearings),
    where a command's 32 tokens hold a few such values. Answer-token loss on commands alone gives the
    vision tower from scratch too weak a signal: in a run without it the tower's weights moved no further
    from their initialisation than a random walk of its steps, and the VLM learned the text target's
    priors (every go-to began with a search turn).
    """

    def __init__(self, processor, config, vocab: int, pad_id: int, seed: int, variation: Variation,
                 combos: Sequence[str], caption: float = 0.0, stop_id: int | None = None,
                 log=None) -> None:
        self.processor, self.config, self.vocab, self.pad_id = processor, config, vocab, pad_id
        self.seed, self.variation, self.combos = seed, variation, tuple(combos)
        self.caption, self.stop_id, self.log = caption, stop_id, log
        self.caption_prompt = tuple(caption_prompt_ids(processor)) if caption > 0 else ()
        self.render_s = 0.0
        self.looks = {"plain": 0, "varied": 0, "occluded": 0, "extras": 0}
        self.captions = 0
        self._losses: dict[str, list[float]] = {"command": [], "caption": []}

    def frames(self, examples: Sequence[FrameTokens], step: int) -> list[bytes]:
        began = time.monotonic()
        jpegs = []
        for row, e in enumerate(examples):
            rng = random.Random(f"look:{self.seed}:{step}:{row}")
            named = e.frame.episode.intent.target or ""
            look = random_look(rng, e.frame.episode.scene, e.frame.pose, self.combos, named, self.variation)
            self.looks["plain" if look == PLAIN else "varied"] += 1
            self.looks["occluded"] += bool(look.occluded)
            self.looks["extras"] += look.extras
            jpegs.append(render_frame(e.frame.episode.scene, e.frame.pose, look, self.config))
        self.render_s += time.monotonic() - began
        return jpegs

    def captioned(self, examples: Sequence[FrameTokens], jpegs: Sequence[bytes], step: int) -> list[FrameTokens]:
        """The rows with a seeded ``caption`` share of them turned into the caption task for their own frame."""
        if self.caption <= 0:
            return list(examples)
        import cv2
        import numpy as np

        from speculative_vlm.commands.scene_text import describe_image

        tokenizer = self.processor.tokenizer
        rows = []
        for row, (e, jpeg) in enumerate(zip(examples, jpegs, strict=True)):
            if random.Random(f"caption:{self.seed}:{step}:{row}").random() < self.caption:
                text = describe_image(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
                answer = (*tokenizer(text, add_special_tokens=False)["input_ids"], self.stop_id)
                e = replace(e, family="caption", prompt_ids=self.caption_prompt, answer_ids=answer)
                self.captions += 1
            rows.append(e)
        return rows

    def __call__(self, model, examples: list[FrameTokens], step: int) -> tuple[torch.Tensor, float]:
        jpegs = self.frames(examples, step)
        rows = self.captioned(examples, jpegs, step)
        batch = collate_frames(rows, jpegs, self.processor, self.pad_id)
        losses, accuracy = answer_token_losses(model, batch, self.vocab)
        captions = torch.tensor([r.family == "caption" for r in rows])[batch.rows]
        for kind, mask in (("caption", captions), ("command", ~captions)):
            self._losses[kind].extend(losses[mask].detach().tolist())
        if self.log is not None and step % 50 == 0:
            self.log(f"[train] step {step}: mean answer-token loss since the last line: " + ", ".join(
                f"{k} {sum(v) / len(v):.4f} ({len(v)} tokens)" for k, v in self._losses.items() if v))
            self._losses = {k: [] for k in self._losses}
        return losses.mean(), accuracy


def add_trainable(vlm, rank: int, alpha: int, dropout: float):
    """The VLM with its vision tower and connector trainable and, with ``rank`` > 0, a LoRA (peft) on the text
    model's projections; everything else frozen."""
    for p in vlm.parameters():
        p.requires_grad_(False)
    model = vlm
    if rank > 0:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TEXT_PROJECTIONS,
                            bias="none")
        model = get_peft_model(vlm, config)
    for part in (vlm.model.vision_model, vlm.model.connector):
        for p in part.parameters():
            p.requires_grad_(True)
    return model


# ---- measurement -----------------------------------------------------------------------------------------
def greedy_batch(vlm, processor, prompts: Sequence[Sequence[int]], jpegs: Sequence[bytes], stop_ids: set[int],
                 vocab: int, matchers: list | None = None, max_new_tokens: int = 64) -> list[list[int]]:
    """Greedy answers of the VLM to a batch of image prompts, constrained by ``matchers`` (one xgrammar
    matcher each) when given: what the engine answers one at a time
    (:func:`~speculative_vlm.training.teacher_data.generate_batch` with the frames' pixels)."""
    from speculative_vlm.training.teacher_data import generate_batch

    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    outs = generate_batch(vlm, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad, top_k=1,
                          matchers=matchers, vocab=vocab, images=pixels(processor, jpegs),
                          unshared_token=first_image_token(processor))
    return [answer for answer, _, _ in outs]


def single_step(vlm, processor, states: Sequence, vocab: int, batch_size: int = 8,
                system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """The VLM's greedy answers under the command grammar to held-out states from their frames alone,
    judged for direction (the rows :func:`speculative_vlm.training.train_target.single_step` gives)."""
    import xgrammar as xgr

    from speculative_vlm.commands.grammar import compile_grammar
    from speculative_vlm.evaluation.single_step import judged_row

    eos = vlm.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    compiled = compile_grammar("command", processor.tokenizer, vocab, stop_token_ids=sorted(stop_ids))
    rows = []
    for start in range(0, len(states), batch_size):
        chunk = states[start : start + batch_size]
        prompts = [vlm_prompt_ids(processor, s.observation.instruction, s.observation.progress, system_prompt)
                   for s in chunk]
        answers = greedy_batch(vlm, processor, prompts, [s.observation.frame_jpeg for s in chunk], stop_ids, vocab,
                               [xgr.GrammarMatcher(compiled) for _ in chunk])
        for state, answer in zip(chunk, answers, strict=True):
            text = processor.tokenizer.decode([t for t in answer if t not in stop_ids], skip_special_tokens=True)
            rows.append(judged_row(state, text, user_message(state.observation.instruction, "",
                                                             state.observation.progress)))
    return rows


# ---- the shipped delta -----------------------------------------------------------------------------------
def save_delta(model, processor, folder: Path, backbone: str, backbone_stamp, settings: VisionSettings,
               base_vocab: int) -> float:
    """Write the VLM's delta on its backbone (see the module docstring), fp16; returns its weights' size in MB."""
    from safetensors.torch import save_file

    vlm = model.get_base_model() if hasattr(model, "get_base_model") else model
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in vlm.state_dict().items()
             if k.startswith(("model.vision_model.", "model.connector."))}
    state[IMAGE_ROWS_KEY] = vlm.get_input_embeddings().weight[base_vocab:].detach().half().contiguous()
    save_file(state, folder / VLM_WEIGHTS_FILE, metadata={"format": "pt"})
    lora = None
    if model is not vlm:  # a peft model: the LoRA on the text model
        from safetensors.torch import load_file

        model.peft_config["default"].base_model_name_or_path = backbone
        model.save_pretrained(folder, save_embedding_layers=False)
        weights = folder / "adapter_model.safetensors"
        save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, weights,
                  metadata={"format": "pt"})
        (folder / "README.md").unlink(missing_ok=True)
        c = model.peft_config["default"]
        lora = {"rank": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout, "targets": TEXT_PROJECTIONS}
    config = vlm.config.to_dict()
    (folder / VLM_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    vlm.generation_config.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / VLM_DELTA_FILE).write_text(json.dumps({
        "backbone": backbone, "backbone_stamp": backbone_stamp, "base_vocab": base_vocab,
        "vision": asdict(settings), "lora": lora}, indent=2) + "\n")
    weights = [folder / VLM_WEIGHTS_FILE, folder / "adapter_model.safetensors"]
    return sum(f.stat().st_size for f in weights if f.exists()) / 1e6


# ---- the run ---------------------------------------------------------------------------------------------
def run(args: TrainTargetOptions) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speculative_vlm.decoding.model_store import merge_vlm_delta, model_stamp, resolve
    from speculative_vlm.decoding.models import ModelAdapter
    from speculative_vlm.evaluation.episodes import generate_episodes
    from speculative_vlm.evaluation.phrasings import HELDOUT, TRAIN
    from speculative_vlm.evaluation.single_step import expert_states
    from speculative_vlm.evaluation.splits import make_splits
    from speculative_vlm.evaluation.world import WorldConfig
    from speculative_vlm.training import train_target
    from speculative_vlm.training.augment import reworded
    from speculative_vlm.training.finetune import FitSettings, fit
    from speculative_vlm.training.target_data import DataRecipe, frame_examples, stop_token_id
    from speculative_vlm.training.vlm_model import build_vlm, vision_parameters

    resolve_mode_defaults(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out if args.out is not None else SHIPPED_DELTA
    log = train_target.RunLog(out, "train-vlm", args.threads, "speculative-vlm train-target --vision")
    stage = log.stage
    config = replace(WorldConfig.from_config(args.config), progress_line=True)
    backbone_dir = resolve(args.backbone)
    backbone_name = args.backbone if not Path(args.backbone).expanduser().is_dir() else str(backbone_dir)
    settings = VisionSettings(image_size=args.image_size, patch_size=args.patch_size, layers=args.vision_layers,
                              hidden=args.vision_hidden, heads=args.vision_heads,
                              intermediate=4 * args.vision_hidden, scale_factor=args.scale_factor)
    variation = Variation(plain=args.plain_frames)
    recipe = DataRecipe(args.episodes, args.perturbed_episodes, args.perturb, args.data_seed, args.split_seed)
    with log.phase("data"):
        frames = frame_examples(recipe, config, args.data_cache, log)
        # The same fresh wordings as the text target's (augment.reworded), drawn from the same seed.
        intents = {f.example.episode: f.episode.intent for f in frames}
        frames = [FrameExample(e, f.episode) for e, f in
                  zip(reworded([f.example for f in frames], intents, args.reword, args.restyle, args.data_seed),
                      frames, strict=True)]
        tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
        backbone = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.float32)
        base_vocab = int(backbone.get_output_embeddings().weight.shape[0])
        stop_id = stop_token_id(tokenizer, backbone.config)
        vlm, processor = build_vlm(backbone, tokenizer, settings, seed=args.seed)
        tokens = tokenize_frames(frames, processor, stop_id)
        families: dict[str, int] = {}
        for t in tokens:
            families[t.family] = families.get(t.family, 0) + 1
        data = {"examples": len(tokens), "episodes": len({f.example.episode for f in frames}),
                "families": dict(sorted(families.items())),
                "prompt_tokens_mean": round(sum(len(t.prompt_ids) for t in tokens) / max(len(tokens), 1), 1),
                "answer_tokens_mean": round(sum(len(t.answer_ids) for t in tokens) / max(len(tokens), 1), 1),
                "image_tokens": settings.image_tokens, "parameters": vision_parameters(vlm)}
        log(f"[data] {json.dumps(data)}")
        held = generate_episodes(make_splits(args.split_seed)[HELDOUT], max(66, args.eval_episodes), args.eval_seed)
        states = expert_states(held, config, max(args.single_step, args.probe))
        loop_episodes = [e for e in held if e.instruction.strip()][: args.eval_episodes]
        if args.eval_max_steps:
            loop_episodes = [replace(e, max_steps=min(e.max_steps, args.eval_max_steps)) for e in loop_episodes]
        log(f"[data] held-out measurement: {len(states)} prompts with their frames, {len(loop_episodes)} episodes")

    metrics: dict = {"data": {**data, "recipe": {**asdict(recipe), "reword": args.reword, "restyle": args.restyle},
                              "variation": asdict(variation)}}
    if args.baseline:
        with log.phase("measure text target"):
            text = ModelAdapter(backbone, tokenizer, name=backbone_name)
            metrics["text"] = train_target._measure(backbone_name + " (scene text)", text, states[: args.single_step],
                                                    loop_episodes, config, log)
            text = None
    backbone = None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fit_settings = FitSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=args.warmup_steps, seed=args.seed, minutes=args.minutes,
                               max_steps=args.max_steps, autocast=args.autocast)
    combos = make_splits(args.split_seed)[TRAIN].combos
    pretrained = None
    if args.vision_pretrain_steps:
        from speculative_vlm.training.vision_pretrain import pretrain_vision

        with log.phase("vision pretraining"):
            # Its own looks (another seed), so stage 2's frames are drawn as without it.
            looks = FrameSteps(processor, config, base_vocab, pad, args.seed + 1, variation, combos)
            pretrained = pretrain_vision(vlm, processor, looks.frames, tokens, args.vision_pretrain_steps,
                                         seed=args.seed, log=log)
    with log.phase("train"):
        torch.manual_seed(args.seed)
        model = add_trainable(vlm, args.rank, args.alpha, args.dropout)
        model.train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"[train] vision tower + connector + LoRA rank {args.rank}: {trainable / 1e6:.2f}M trainable parameters; "
            f"{len(tokens)} examples, {args.epochs} epochs, batch {args.batch_size}, {settings.image_tokens} image "
            f"tokens per frame of {settings.image_size} px")
        steps = FrameSteps(processor, config, base_vocab, pad, args.seed, variation, combos, caption=args.caption,
                           stop_id=stop_id, log=log)
        probe_states = states[: args.probe]
        metrics["data"]["probe"] = len(probe_states)

        def probe() -> float:
            rows = single_step(vlm, processor, probe_states, base_vocab)
            return sum(r["correct"] for r in rows) / len(rows)

        report = fit(model, tokens, pad, fit_settings, log, probe if probe_states else None, args.probe_every,
                     step_loss=steps)
        log(f"[train] frames: {json.dumps(steps.looks)}, {steps.captions} rows as the caption task; rendering took "
            f"{steps.render_s / 60:.1f} min of the training")
    with log.phase("save and merge"):
        size_mb = save_delta(model, processor, stage, backbone_name, model_stamp(backbone_dir), settings, base_vocab)
        log(f"[save] delta {size_mb:.1f} MB (fp16 safetensors) in {stage}")
        if size_mb > train_target.MAX_ADAPTER_MB:
            log(f"[save] WARNING: the delta is over the {train_target.MAX_ADAPTER_MB:.0f} MB a shipped delta may "
                "weigh; lower --rank or the vision tower's size")
        model = vlm = None
        merged_model, merged_processor = merge_vlm_delta(stage, backbone=backbone_dir)
        merged = ModelAdapter(merged_model, merged_processor.tokenizer, merged_processor,
                              name=f"{VLM_TARGET} (this run)")
        prefill_ms = prefill_cost(merged, states[0].observation)
        log(f"[save] prefill of one frame's prompt: {prefill_ms['prompt_ms']:.0f} ms for {prefill_ms['tokens']} ids "
            f"(vision tower + connector alone {prefill_ms['vision_ms']:.0f} ms)")
    with log.phase("measure VLM target"):
        log(f"[eval] {merged.name}: single-step direction on {args.single_step} held-out prompts, from pixels")
        single = single_step(merged_model, merged_processor, states[: args.single_step], merged.vocab_size)
        log(f"[eval] {merged.name}: {sum(r['correct'] for r in single)}/{len(single)} direction-correct; closed "
            f"loop on {len(loop_episodes)} held-out episodes")
        loop = train_target.closed_loop(merged, loop_episodes, config, log, perception="image")
        metrics["trained"] = train_target._scores(merged.name, single, loop)
        log(f"[eval] {merged.name}: closed loop {metrics['trained']['closed_loop']['passed']}/{len(loop)} succeeded")

    metrics.update({
        "method": {"vision": asdict(settings), "lora": {"rank": args.rank, "alpha": args.alpha,
                                                         "dropout": args.dropout},
                   "fit": asdict(fit_settings), "trainable_parameters": trainable, "backbone": backbone_name,
                   "backbone_stamp": model_stamp(backbone_dir)},
        "training": asdict(report),
        "frames": {**steps.looks, "captions": steps.captions, "caption_share": args.caption},
        "vision_pretrain": pretrained,
        "render_minutes": round(steps.render_s / 60, 1),
        "prefill": prefill_ms,
        "delta_mb": round(size_mb, 1),
        **log.record(args),
    })
    return log.publish(metrics, card(metrics), VLM_TARGET)


def prefill_cost(adapter, observation, repeats: int = 3) -> dict:
    """Median ms of the engine's prefill of one frame's prompt, and of the vision tower + connector alone."""
    from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest

    request = SessionRequest(prompt=observation.prompt(), system=SYSTEM_PROMPT, image=observation.frame_jpeg,
                             settings=GenerationSettings(grammar="command"))
    prompt = adapter.encode(request)
    whole, vision = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        adapter.start(prompt)
        whole.append(time.perf_counter() - began)
        with torch.inference_mode():
            began = time.perf_counter()
            adapter.model.model.get_image_features(prompt.extra["pixel_values"], prompt.extra["pixel_attention_mask"])
            vision.append(time.perf_counter() - began)
    return {"tokens": len(prompt.ids), "prompt_ms": round(1000 * sorted(whole)[repeats // 2], 1),
            "vision_ms": round(1000 * sorted(vision)[repeats // 2], 1)}


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "-"


def _pretrain_text(pre: dict | None) -> str:
    if not pre:
        return "none (the tower learned from the answer tokens alone)."
    b, a = pre["before"], pre["after"]
    return (f"the vision tower and connector first learned each image token's region ({pre['grid']} x "
            f"{pre['grid']} grid) from the describer's colour blobs, with a linear probe thrown away afterwards: "
            f"{pre['steps']} steps of {pre['batch_size']} frames, lr {pre['lr']}, {pre['minutes']} min. On "
            f"{pre['validation_rows']} training rows kept out of it, regions holding an object named by colour "
            f"{b['object_colour']:.0%} -> {a['object_colour']:.0%} right and by shape {b['object_shape']:.0%} -> "
            f"{a['object_shape']:.0%} ({a['object_regions']} of {a['regions']} regions hold one).")


def card(m: dict) -> str:
    """The card: architecture, data, method, the run, and the held-out numbers against the text target."""
    d, t, fs, v = m["data"], m["training"], m["method"]["fit"], m["method"]["vision"]
    r, lora, p = d["recipe"], m["method"]["lora"], d["parameters"]
    models = [m[k] for k in ("text", "trained") if k in m]
    header = "| metric (held-out split) | " + " | ".join(f"`{x['model']}`" for x in models) + " |"
    rows = [header, "|---|" + "---|" * len(models),
            "| single-step direction correctness | "
            + " | ".join(_pct(x["single_step"]["correct"], x["single_step"]["answers"]) for x in models) + " |",
            "| single-step, main axis only (looser) | "
            + " | ".join(_pct(x["single_step"]["main_axis"], x["single_step"]["answers"]) for x in models) + " |",
            "| closed-loop success | "
            + " | ".join(_pct(x["closed_loop"]["passed"], x["closed_loop"]["episodes"]) for x in models) + " |"]
    for f in sorted({f for x in models for f in x["closed_loop"]["families"]}):
        cells = [x["closed_loop"]["families"].get(f) for x in models]
        rows.append(f"| closed loop, {f} | " + " | ".join(_pct(c["passed"], c["episodes"]) if c else "-"
                                                          for c in cells) + " |")
    curve = t["curve"]
    picks = curve[:: max(1, len(curve) // 8)]
    curve_text = ", ".join(f"{s}: {loss:.3f}" for s, loss, _ in picks)
    if curve and curve[-1] not in picks:
        curve_text += f", {curve[-1][0]}: {curve[-1][1]:.3f}"
    probes = ", ".join(f"step {s}: {100 * x:.0f}%" for s, x in t["probes"])
    samples = "\n".join(f"- `{s['prompt']!r}` -> `{s['text']}` ({'right' if s['correct'] else 'wrong'} way)"
                        for s in m["trained"]["samples"])
    capped = (f" **Stopped by the {fs['minutes']:.0f}-minute cap at step {t['steps']} of {t['planned_steps']}.**"
              if t["stopped_by_cap"] else "")
    phases = ", ".join(f"{k} {x / 60:.1f} min" for k, x in m["phases_s"].items())
    fr = m["frames"]
    lora_text = (f"a LoRA of rank {lora['rank']} (alpha {lora['alpha']}, dropout {lora['dropout']}) on the text "
                 "model's attention and MLP projections" if lora["rank"] else "no LoRA (the backbone frozen)")
    return f"""# {VLM_DELTA}: the robot target that sees the camera

An Idefics3 (SmolVLM architecture) on `{m['method']['backbone']}`: a vision tower trained from
scratch ({v['image_size']} px frames, {v['patch_size']} px patches, {v['layers']} layers of width {v['hidden']}:
{p['vision'] / 1e6:.2f}M parameters), the pixel-shuffle connector (scale {v['scale_factor']}: {d['image_tokens']} image
tokens per frame, {p['connector'] / 1e6:.2f}M parameters) and {lora_text}. The delta is
{m['delta_mb']} MB of fp16 safetensors; `speculative-vlm prepare-models` (run by scripts/setup) merges it
into the model store as `{VLM_TARGET}`, a folder that `AutoModelForImageTextToText` and
`AutoProcessor` load. The image tokens are appended after the backbone's 49,152 ids and suppressed
in generation: the model outputs exactly the text draft's ids.

Prompt: the robot's own (system prompt, `Instruction:`, `Scene:`, `Progress:`) with the frame on the
`Scene:` line instead of the describer's text: pixels alone, no ground truth. A prefill of one
frame's prompt ({m['prefill']['tokens']} ids) took {m['prefill']['prompt_ms']:.0f} ms here, the vision tower and connector
{m['prefill']['vision_ms']:.0f} ms of it.

## Data (train split only)
- The text target's rollouts (`training/target_data.py`): {r['episodes']} expert episodes plus
  {r['perturbed_episodes']} with moves replaced at random (chance {r['perturb']}), episode seed {r['seed']},
  split seed {r['split_seed']}; {d['examples']} steps from {d['episodes']} rollouts (steps with the same prompt text kept
  once per pose). Families: {', '.join(f'{k} {x}' for k, x in d['families'].items())}. As for the text target,
  {r.get('reword', 0):.0%} of the steps carry a fresh train-split wording of their intent ({r.get('restyle', 0):.0%} of
  those restyled; `training/augment.py`).
- Each step's frame rendered again from the robot's pose every time it is used, with a look drawn from
  (seed, step, row) (`training/vlm_frames.py`): {fr['plain']} plain frames, {fr['varied']} varied (room colours and
  tiling, light gain and colour, gradient, noise, blur, JPEG quality 35-95), {fr['occluded']} with an occluder
  in front of a visible object, {fr['extras']} picture-only objects in all. Rendering took
  {m['render_minutes']} min of the training.
- Mean prompt {d['prompt_tokens_mean']} ids (the frame's {d['image_tokens']} image tokens and 3 markers among them), answer
  {d['answer_tokens_mean']}.

## Method and hyperparameters
- Stage 1 (`training/vision_pretrain.py`): {_pretrain_text(m.get('vision_pretrain'))}
- Trainable: vision tower and connector (new) and the LoRA; {m['method']['trainable_parameters'] / 1e6:.2f}M parameters.
- Caption task: {fr.get('caption_share', 0):.0%} of the rows ({fr.get('captions', 0)} in all) ask instead to describe their frame
  ("{CAPTION_REQUEST}", no instruction) and are answered with what the scene describer reads in that very
  rendered frame: dense supervision of the vision tower; the robot never asks it, and the command grammar
  would not let the model answer it anyway.
- Loss: cross-entropy on the answer tokens only, over the 49,152 output ids. AdamW (no weight decay), lr
  {fs['lr']}, {fs['warmup_steps']} warm-up steps then cosine to 0 over {t['planned_steps']} steps ({fs['epochs']} epochs,
  batch {fs['batch_size']}), gradient clipping 1.0, seed {fs['seed']} (torch, data order and looks).
- {'bfloat16 autocast (float32 weights and optimiser)' if fs.get('autocast') else 'fp32'} on {m['threads']} CPU thread(s): {t['steps']} steps, {t['examples_seen']} examples in {t['minutes']:.1f} min
  ({t['seconds_per_example']:.2f} s per example on average, {t['fastest_seconds_per_example']:.2f} in the fastest
  step).{capped}
- Loss (mean over the steps logged): {curve_text}.
- Held-out direction correctness on the first {d.get('probe', 0)} prompts during training (monitoring only):
  {probes or 'not run'}.

## Results (held-out split, greedy under the command grammar)
{chr(10).join(rows)}

The text target reads the describer's scene text (`commands/scene_text.py`), the VLM target the
frame. Single step: held-out prompts of `speculative-vlm eval` (expert rollouts of held-out episodes,
eval seed {m['eval']['seed']}), answered once each (batched constrained greedy); closed loop: the first
held-out episodes of that seed, run by each model alone through the parser, the motion limits and
the simulated Go2, judged by each family's rule.

Samples (VLM target):
{samples}

## The run
`{m['command']}`: {m['total_minutes']} min in all ({phases}); peak RSS {m['peak_rss_mb']} MB;
load average {m['load_average']['start']} at the start, {m['load_average']['end']} at the end. The log is `train-log.txt`.
"""
