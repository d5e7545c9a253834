"""`speculative-vlm train-exits`: train the target's early-exit adapters by self-distillation on the robot's prompts.

The prompts are the requests the robot's drafter sends (``DrafterNode.request_for``): the system
prompt of :mod:`speculative_vlm.commands.prompts` and its user message (instruction, scene text,
progress line), with the grammar and token limit of the config's drafter section; for a VLM target
(the drafter's ``perception: image``) the camera frame at the state's pose instead of the scene text. The states they
describe come from expert rollouts of the evaluation's *train* split
(:func:`speculative_vlm.evaluation.examples.training_examples`, what ``train-target`` learns from),
one step drawn from each rollout so every family and every point of an episode shows up; the
held-out split is never used, so ``speculative-vlm eval``'s held-out results stay untouched by the
exits. Agreement is measured on other train-split rollouts (the validation prompts).

The target answers each prompt greedily (all sessions batched through :meth:`TargetEngine.verify`
with empty blocks: the target's own continuation, as when it verifies). One pass over each prompt +
answer then records, at every exit layer, the hidden state, and at the last layer the target's own
next-token distribution (the teacher). Each exit adapter is trained to match the teacher (KL over
the teacher's top tokens), the target frozen. Agreement = the share of answer positions where the
exit's argmax equals the final layer's, before and after training.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from speculative_vlm.commands.prompts import SYSTEM_PROMPT, user_message
from speculative_vlm.commands.scene_text import Pose
from speculative_vlm.decoding.exits import ExitAdapter, ExitHeads
from speculative_vlm.decoding.models import ModelAdapter
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import DraftBlock, GenerationSettings, SessionRequest
from speculative_vlm.evaluation.episodes import FAMILIES, Episode, make_episode
from speculative_vlm.evaluation.examples import Example, training_examples
from speculative_vlm.evaluation.phrasings import TRAIN
from speculative_vlm.evaluation.splits import make_splits
from speculative_vlm.evaluation.world import SIM_CONFIG, WorldConfig, drafter_jpeg

DEFAULT_LAYERS = (12, 18, 22, 26)  # the shipped heads' layers (models/exit-heads/card.md)
VALIDATION_START = 10_000  # validation rollouts' first episode index: far from the training ones


def _drafter_settings() -> GenerationSettings:
    return GenerationSettings(max_new_tokens=64, grammar="command")  # the drafter's parameter defaults


@dataclass(frozen=True)
class RobotRequests:
    """How the robot's drafter asks the target, and which train-split rollouts supply the states it asks about."""

    system_prompt: str = SYSTEM_PROMPT
    progress_line: bool = True  # the drafter's ``progress_line``
    settings: GenerationSettings = field(default_factory=_drafter_settings)  # greedy: the target's own answer
    world: WorldConfig = field(default_factory=WorldConfig)
    seed: int = 2  # episode seed of the rollouts
    split_seed: int = 0  # which colour/shape combinations are held out (as ``eval --split-seed``)
    perception: str = "scene_text"  # the drafter's: scene_text, or image (the frame to a VLM target)

    @classmethod
    def from_config(cls, path: str | Path = SIM_CONFIG, **overrides) -> RobotRequests:
        """The drafter section (system prompt, progress line, grammar, token limit) and world of a bringup config."""
        sections = yaml.safe_load(Path(path).read_text()) or {}
        drafter = (sections.get("drafter") or {}).get("ros__parameters") or {}
        settings = GenerationSettings(max_new_tokens=int(drafter.get("max_new_tokens", 64)),
                                      grammar=str(drafter.get("grammar", "command")))
        fields = dict(system_prompt=drafter.get("system_prompt") or SYSTEM_PROMPT,
                      progress_line=bool(drafter.get("progress_line", True)), settings=settings,
                      world=WorldConfig.from_config(path), perception=str(drafter.get("perception", "scene_text")))
        return cls(**{**fields, **overrides})

    def examples(self, count: int, start: int = 0) -> list[Example]:
        """One robot state from each of ``count`` train-split rollouts (episode indices from ``start``).

        Rollouts whose instruction is blank are skipped (the robot refuses those before any model
        sees them) and more are drawn. Deterministic for the same arguments.
        """
        rng = random.Random(f"exit-prompts:{self.seed}:{self.split_seed}:{start}")
        chosen: list[Example] = []
        index = start
        while len(chosen) < count:
            batch = count - len(chosen)
            episodes: dict[str, list[Example]] = {}
            for example in training_examples(batch, self.seed, self.split_seed, self.world, start=index):
                if example.instruction.strip():
                    episodes.setdefault(example.episode, []).append(example)
            chosen.extend(rng.choice(steps) for steps in episodes.values())
            index += batch
        return chosen[:count]

    def request(self, example: Example) -> SessionRequest:
        """The session request the drafter sends for this state (``DrafterNode.request_for``): with perception
        image, the frame at the state's pose and no scene text (the target sees the pixels)."""
        progress = example.progress if self.progress_line else ""
        if self.perception == "image":
            return SessionRequest(prompt=user_message(example.instruction, "", progress), system=self.system_prompt,
                                  image=drafter_jpeg(self._episode(example.episode).scene,
                                                     Pose(example.x, example.y, example.yaw), self.world),
                                  settings=self.settings)
        return SessionRequest(prompt=user_message(example.instruction, example.scene_text, progress),
                              system=self.system_prompt, settings=self.settings)

    def _episode(self, episode_id: str) -> Episode:
        """The train-split episode a rollout ran (``training_examples`` deals the families in turn)."""
        index = int(episode_id.rsplit("-", 1)[1])
        return make_episode(make_splits(self.split_seed)[TRAIN], FAMILIES[index % len(FAMILIES)], index, self.seed)


def generate_answers(engine: TargetEngine, requests: list[SessionRequest]) -> list[list[int]]:
    """Full ids (prompt + the target's greedy answer) per request, all sessions batched per step."""
    sessions = [engine.open_session(r) for r in requests]
    step = 0
    while True:
        live = [s for s in sessions if not s.done]
        if not live:
            break
        for result in engine.verify([(s, DraftBlock(step, len(s.output), (), ())) for s in live]):
            if isinstance(result, Exception):
                raise result
        step += 1
    out = [list(s.kv.ids) for s in sessions]
    for s in sessions:
        engine.close_session(s)
    return out


@dataclass
class Features:
    hidden: dict[int, torch.Tensor]  # layer -> (N, H) at answer positions (and prompt tail)
    teacher_idx: torch.Tensor  # (N, K) top tokens of the final layer
    teacher_logp: torch.Tensor  # (N, K) their log-probs
    final_argmax: torch.Tensor  # (N,)


@torch.inference_mode()
def collect(target: ModelAdapter, sequences: list[tuple[list[int], int, dict]], layers: list[int],
            top_k: int) -> Features:
    """Hidden states at the exit layers and the teacher's top-k, at every answer position (``sequences``: full
    ids, prompt length, and the prompt's extra model inputs: a VLM's pixels)."""
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    idx, logp, best = [], [], []
    for ids, prompt_len, extra in sequences:
        out = target.model(input_ids=torch.tensor([ids]), **extra, output_hidden_states=True)
        # Positions predicting answer tokens: from the last prompt token to the last-but-one id.
        sl = slice(prompt_len - 1, len(ids) - 1)
        for layer in layers:
            # hidden_states[0] is the embedding output; layer l's output is hidden_states[l + 1].
            hidden[layer].append(out.hidden_states[layer + 1][0, sl].float())
        logits = out.logits[0, sl, : target.vocab_size].float()  # a VLM's image-token ids are never output
        lp = torch.log_softmax(logits, -1)
        top = torch.topk(lp, top_k, dim=-1)
        idx.append(top.indices)
        logp.append(top.values)
        best.append(logits.argmax(-1))
    return Features(
        {k: torch.cat(v) for k, v in hidden.items()}, torch.cat(idx), torch.cat(logp), torch.cat(best)
    )


@torch.inference_mode()
def agreement(heads: ExitHeads, feats: Features) -> dict[int, float]:
    return {
        layer: float((heads.logits(layer, feats.hidden[layer]).argmax(-1) == feats.final_argmax).float().mean())
        for layer in heads.layers
    }


def train_layer(
    target: ModelAdapter, adapter: ExitAdapter, hidden: torch.Tensor, feats: Features, steps: int, lr: float
) -> None:
    # The loss is computed over the union of the teacher's top tokens only: the head's
    # full 49k-column matmul per step would dominate the cost on a CPU.
    vocab = torch.unique(feats.teacher_idx)
    remap = torch.full((target.vocab_size,), -1, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    cols = remap[feats.teacher_idx]
    teacher = torch.softmax(feats.teacher_logp, -1)  # renormalised over its top-k
    weight = target.lm_head.weight.detach()[vocab].float()
    norm = target.final_norm
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    batch = min(512, hidden.shape[0])
    adapter.train()
    for _ in range(steps):
        pick = torch.randint(0, hidden.shape[0], (batch,), generator=gen)
        h = adapter(hidden[pick])
        logits = norm(h.to(target.dtype)).float() @ weight.T
        logp = torch.log_softmax(logits, -1).gather(-1, cols[pick])
        loss = -(teacher[pick] * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter.eval()


def train_exits(
    target: ModelAdapter,
    layers: list[int],
    train_prompts: int = 48,
    validation_prompts: int = 12,
    steps: int = 300,
    lr: float = 3e-3,
    inner: int = 256,
    top_k: int = 32,
    robot: RobotRequests | None = None,
    log: Callable[[str], None] = print,
) -> tuple[ExitHeads, dict]:
    """Exit adapters for ``layers`` trained on the robot's requests (see the module docstring), and a report."""
    start = time.monotonic()
    robot = robot or RobotRequests()
    for p in target.model.parameters():
        p.requires_grad_(False)
    engine = TargetEngine(target, max_batch=64)
    train_examples = robot.examples(train_prompts)
    validation_examples = robot.examples(validation_prompts, start=VALIDATION_START)
    requests = [robot.request(e) for e in (*train_examples, *validation_examples)]
    seqs = []
    for request, ids in zip(requests, generate_answers(engine, requests), strict=True):
        prompt = target.encode(request)
        seqs.append((ids, len(prompt.ids), prompt.extra))
    generated_at = time.monotonic()
    log(f"generated {len(seqs)} answers ({sum(len(i) - n for i, n, _ in seqs)} tokens) in {generated_at - start:.0f} s")
    train = collect(target, seqs[:train_prompts], layers, top_k)
    validation = collect(target, seqs[train_prompts:], layers, top_k)
    collected_at = time.monotonic()
    before = agreement(ExitHeads(target, layers), validation)
    train_before = agreement(ExitHeads(target, layers), train)
    adapters = {layer: ExitAdapter(target.hidden_size, inner) for layer in layers}
    for layer in layers:
        train_layer(target, adapters[layer], train.hidden[layer], train, steps, lr)
    heads = ExitHeads(target, layers, adapters)
    after = agreement(heads, validation)
    train_after = agreement(heads, train)
    report = {
        "layers": layers,
        "prompts": {
            "source": "the drafter's requests (commands/prompts.py) for states of train-split expert rollouts",
            "perception": robot.perception,
            "seed": robot.seed, "split_seed": robot.split_seed, "progress_line": robot.progress_line,
            "system_prompt_is_default": robot.system_prompt == SYSTEM_PROMPT,
            "grammar": robot.settings.grammar, "max_new_tokens": robot.settings.max_new_tokens,
            "train_episodes": [e.episode for e in train_examples],
            "validation_episodes": [e.episode for e in validation_examples],
        },
        "train_positions": int(train.final_argmax.shape[0]),
        "validation_positions": int(validation.final_argmax.shape[0]),
        "agreement_before": {str(k): round(v, 4) for k, v in before.items()},
        "agreement_after": {str(k): round(v, 4) for k, v in after.items()},
        "train_agreement_before": {str(k): round(v, 4) for k, v in train_before.items()},
        "train_agreement_after": {str(k): round(v, 4) for k, v in train_after.items()},
        "seconds": round(time.monotonic() - start, 1),
        "seconds_generating": round(generated_at - start, 1),
        "seconds_collecting": round(collected_at - generated_at, 1),
        "seconds_training": round(time.monotonic() - collected_at, 1),
    }
    return heads, report


def config_target(path: str | Path) -> str:
    """The target a bringup config's verifier serves (its cloud_server ``model``)."""
    sections = yaml.safe_load(Path(path).read_text()) or {}
    model = ((sections.get("cloud_server") or {}).get("ros__parameters") or {}).get("model")
    if not model:
        raise ValueError(f"{path} has no cloud_server model; pass --target")
    return str(model)
