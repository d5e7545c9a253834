"""Collect the target's own answers (and its top-k log-probs) as distillation data for a draft.

The draft is only useful if it predicts what the *target* will say to what the robot sends, so
the data are the target's constrained greedy answers to the robot's own requests, plus its
unconstrained greedy answers to short general instructions, so the draft is passable outside
the domain. The robot's requests (:class:`RobotPrompt`: instruction, scene text, progress line,
under the system prompt of :mod:`speculative_vlm.commands.prompts`) come from the evaluation's
rollouts in the simulated Go2:

* training prompts from the very rollouts the target learnt from
  (:func:`speculative_vlm.training.target_data.cached_examples`: expert and perturbed rollouts of
  the *train* split, cached on disk and shared with ``train-target``), a seeded sample of their
  distinct states (:func:`training_prompts`);
* held-out prompts, on which acceptance is measured, from expert rollouts of the *held-out*
  split (:func:`heldout_prompts`: its colour/shape combinations, layouts and phrasings never
  appear in training), one step of each episode.

Generation is a batched greedy loop with the KV cache written here rather than HF
``generate`` with a logits processor (about 7x slower on CPU): every robot prompt shares
the system prompt, so its KV is computed once per batch and the per-prompt suffixes follow
it with padding in between (masked out, positions kept contiguous). Answers are cached on
disk in shards, one per batch, under a folder keyed by the target's weights and the grammar,
each shard named by the hash of its prompts' token ids, so whatever changes a prompt (the
rollouts, the progress line, the sample) or the target changes the key; an interrupted run
resumes and ``train-draft`` reuses what an earlier run collected.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speculative_vlm.commands.grammar import compile_grammar, grammar_source
from speculative_vlm.commands.prompts import SYSTEM_PROMPT, user_message
from speculative_vlm.decoding.models import common_prefix
from speculative_vlm.evaluation.episodes import generate_episodes
from speculative_vlm.evaluation.phrasings import HELDOUT, TRAIN
from speculative_vlm.evaluation.single_step import expert_states
from speculative_vlm.evaluation.splits import make_splits
from speculative_vlm.evaluation.world import WorldConfig
from speculative_vlm.training.general_prompts import sample_general_prompt
from speculative_vlm.training.target_data import DataRecipe, cached_examples, prompt_ids

FORMAT_VERSION = 2  # 2: robot prompts from rollouts, shards named by their prompts, the target keyed by its weights


@dataclass
class Example:
    """One prompt and the target's answer, with the target's top-k log-probs per answer token."""

    kind: str  # "command" or "general"
    prompt_ids: list[int]
    answer_ids: list[int]  # includes the stop token when the target produced one
    topk_ids: np.ndarray  # (len(answer_ids), k) int32
    topk_logp: np.ndarray  # (len(answer_ids), k) float16, log-probs under the grammar mask if any
    family: str = ""  # a command prompt's instruction family (evaluation.families), "" for general ones


@dataclass(frozen=True)
class RobotPrompt:
    """One request of the robot's drafter: the user message's parts, and the rollout state it describes."""

    split: str  # the evaluation split of its episode: "train" or "heldout"
    episode: str
    family: str
    instruction: str
    scene_text: str
    progress: str  # the odometry progress line, "" when the robot sends none

    @property
    def text(self) -> str:
        """The user message the robot sends."""
        return user_message(self.instruction, self.scene_text, self.progress)


def training_prompts(
    count: int,
    recipe: DataRecipe,
    config: WorldConfig,
    rollout_cache: Path | None,
    *,
    progress_line: bool = True,
    seed: int = 0,
    exclude: Collection[str] = (),
    log: Callable[[str], None] = print,
) -> tuple[list[RobotPrompt], int]:
    """``count`` distinct robot prompts sampled from the recipe's train-split rollouts, and the pool's size.

    The rollouts are ``train-target``'s (:func:`~speculative_vlm.training.target_data.cached_examples`,
    from its cache when an identical run made them). Steps with a blank instruction are left out (the
    robot refuses those before any model sees them), so are prompts whose text is in ``exclude`` (the
    held-out ones). Deterministic for the same arguments.
    """
    pool: dict[str, RobotPrompt] = {}
    for e in cached_examples(recipe, config, rollout_cache, log):
        prompt = RobotPrompt(TRAIN, e.episode, e.family, e.instruction, e.scene_text,
                             e.progress if progress_line else "")
        if e.instruction.strip() and prompt.text not in exclude:
            pool.setdefault(prompt.text, prompt)
    if count > len(pool):
        raise ValueError(f"the recipe's rollouts hold {len(pool)} distinct prompts, fewer than the {count} asked "
                         "for: lower --prompts or raise --episodes")
    return random.Random(f"draft-prompts:{seed}").sample(list(pool.values()), count), len(pool)


def heldout_prompts(
    count: int,
    config: WorldConfig,
    *,
    split_seed: int = 0,
    episode_seed: int = 0,
    progress_line: bool = True,
) -> list[RobotPrompt]:
    """One step of each of ``count`` expert rollouts of the held-out split (never used for training).

    The episodes are ``speculative-vlm eval``'s held-out ones for ``episode_seed`` (episodes whose
    instruction is blank are skipped: the robot refuses those unseen by any model), the step drawn
    by a seeded choice so every point of an episode shows up. Deterministic for the same arguments.
    """
    split = make_splits(split_seed)[HELDOUT]
    rng = random.Random(f"draft-heldout:{split_seed}:{episode_seed}")
    chosen: list[RobotPrompt] = []
    start = 0
    while len(chosen) < count:
        batch = count - len(chosen)
        steps: dict[str, list] = {}
        for state in expert_states(generate_episodes(split, batch, episode_seed, start=start), config):
            steps.setdefault(state.episode.id, []).append(state)
        for states in steps.values():
            state = rng.choice(states)
            obs = state.observation
            chosen.append(RobotPrompt(HELDOUT, state.episode.id, state.episode.intent.family.value, obs.instruction,
                                      obs.scene_text, obs.progress if progress_line else ""))
        start += batch
    return chosen[:count]


@torch.inference_mode()
def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    top_k: int = 32,
    matchers: list | None = None,
    vocab: int | None = None,
    images: dict[str, torch.Tensor] | None = None,
    unshared_token: int | None = None,
) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
    """Greedy answers for a batch of token prompts; with ``matchers`` (one xgrammar matcher each) constrained.

    The prompts' common prefix runs once; the rest is left-padded. Returns, per prompt, the answer
    ids and the top-k (ids, log-probs) at each answer step, taken after the grammar mask, which is
    the distribution the constrained target acts on. Logits past ``vocab`` (default: the model's
    ``config.vocab_size``) are dropped. A VLM gets its frames' ``images`` (``pixel_values`` and
    ``pixel_attention_mask``, one image per prompt) with the prompts' suffixes, and the shared
    prefix stops before ``unshared_token`` (the first image token), so the image tokens are always
    fed with their pixels.
    """
    import xgrammar as xgr

    batch = len(prompts)
    # Keep one prompt token out of the shared prefix so every row has a suffix to feed.
    shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)
    if unshared_token is not None:
        shared = min([shared] + [list(p).index(unshared_token) for p in prompts if unshared_token in p])
    suffixes = [list(p[shared:]) for p in prompts]
    width = max(len(s) for s in suffixes)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    pos = torch.zeros((batch, width), dtype=torch.long)
    for row, s in enumerate(suffixes):
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, shared + width - len(s):] = 1
        pos[row, width - len(s):] = torch.arange(shared, shared + len(s))
    next_pos = torch.tensor([len(p) for p in prompts])

    cache = None
    if shared:
        out = model(input_ids=torch.tensor([list(prompts[0][:shared])]), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(batch)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                use_cache=True, logits_to_keep=1, **(images or {}))
    cache = out.past_key_values
    vocab = vocab or model.config.vocab_size
    bitmask = xgr.allocate_token_bitmask(batch, vocab) if matchers else None
    answers: list[list[int]] = [[] for _ in range(batch)]
    tops: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1, :vocab].float()
        if matchers:
            for row in range(batch):
                if not done[row]:
                    matchers[row].fill_next_token_bitmask(bitmask, row)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
        logp = torch.log_softmax(logits, dim=-1)
        values, indices = logp.topk(top_k, dim=-1)
        chosen = indices[:, 0]
        for row in range(batch):
            if done[row]:
                continue
            token = int(chosen[row])
            answers[row].append(token)
            tops[row].append((indices[row].numpy().astype(np.int32), values[row].numpy().astype(np.float16)))
            if matchers:
                if not matchers[row].accept_token(token):
                    raise RuntimeError(f"grammar refused its own greedy token {token}; the mask is broken")
                done[row] = matchers[row].is_terminated() or token in stop_ids
            else:
                done[row] = token in stop_ids
        if all(done):
            break
        feed = torch.where(torch.tensor(done), torch.tensor(pad_id), chosen).unsqueeze(1)
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        out = model(input_ids=feed, attention_mask=mask, position_ids=next_pos.unsqueeze(1),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        next_pos = next_pos + 1
    results = []
    for row in range(batch):
        tid = np.stack([t[0] for t in tops[row]]) if tops[row] else np.zeros((0, top_k), np.int32)
        tlp = np.stack([t[1] for t in tops[row]]) if tops[row] else np.zeros((0, top_k), np.float16)
        results.append((answers[row], tid, tlp))
    return results


@dataclass(frozen=True)
class DataSpec:
    """What to collect: the robot prompts to answer, and how many general instructions from which seed."""

    commands: tuple[RobotPrompt, ...]
    general: int
    seed: str = "train"  # of the general instructions, and the name in the log
    batch_size: int = 32
    top_k: int = 32
    max_command_tokens: int = 64
    max_general_tokens: int = 48


def weights_digest(model_dir: Path) -> str:
    """A hash of a model folder's config and weights: a retrained model under the same name is another model."""
    digest = hashlib.sha256()
    files = sorted(f for f in Path(model_dir).iterdir()
                   if f.name == "config.json" or f.suffix in (".safetensors", ".bin"))
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as stream:
            digest.update(hashlib.file_digest(stream, "sha256").digest())
    return digest.hexdigest()


class TeacherData:
    """The target, its tokenizer and the command grammar, collecting cached answers."""

    def __init__(self, target_dir: Path, cache_root: Path, grammar: str = "command"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.target_dir = Path(target_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.target_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.target_dir, dtype=torch.float32).eval()
        # The engine's grammar, compiled as the engine compiles it (model EOS as the stop), so
        # the answers are exactly what constrained greedy decoding yields on the robot.
        eos = self.model.config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.compiled = compile_grammar(grammar, self.tokenizer, self.model.config.vocab_size,
                                        stop_token_ids=sorted(self.stop_ids))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # The prompts name each shard; the folder is keyed by what else changes an answer.
        fingerprint = json.dumps(
            [FORMAT_VERSION, self.target_dir.name, weights_digest(self.target_dir), grammar_source(grammar),
             sorted(self.stop_ids)]
        )
        self.cache_dir = Path(cache_root) / hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / "fingerprint.json").write_text(fingerprint)

    def command_ids(self, prompt: RobotPrompt) -> list[int]:
        """The robot prompt's token ids as the engine encodes the drafter's request."""
        return prompt_ids(self.tokenizer, prompt.instruction, prompt.scene_text, prompt.progress, SYSTEM_PROMPT)

    def general_ids(self, seed: str, index: int) -> list[int]:
        """General instruction ``index`` of ``seed``, in the chat template with the assistant turn opened."""
        messages = [{"role": "user", "content": sample_general_prompt(random.Random(f"{seed}:general:{index}"))}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def shard_path(self, kind: str, spec: DataSpec, prompts: Sequence[Sequence[int]]) -> Path:
        """Where one batch's answers are cached: named by the batch's prompts and the generation limits."""
        limit = spec.max_command_tokens if kind == "command" else spec.max_general_tokens
        key = hashlib.sha256(json.dumps([list(p) for p in prompts]).encode()).hexdigest()[:16]
        return self.cache_dir / f"{kind}-k{spec.top_k}-n{limit}-{key}.pt"

    def _shard(self, kind: str, spec: DataSpec, prompts: list[list[int]], families: list[str]) -> list[Example]:
        path = self.shard_path(kind, spec, prompts)
        if path.exists():
            return torch.load(path, weights_only=False)
        import xgrammar as xgr

        constrained = kind == "command"
        matchers = [xgr.GrammarMatcher(self.compiled) for _ in prompts] if constrained else None
        limit = spec.max_command_tokens if constrained else spec.max_general_tokens
        outs = generate_batch(self.model, prompts, max_new_tokens=limit, stop_ids=self.stop_ids,
                              pad_id=self.pad_id, top_k=spec.top_k, matchers=matchers)
        examples = [Example(kind, p, a, i, v, f) for p, f, (a, i, v) in zip(prompts, families, outs, strict=True)]
        tmp = path.with_suffix(".partial")
        torch.save(examples, tmp)
        tmp.replace(path)
        return examples

    def collect(self, spec: DataSpec, log: Callable[[str], None] = print) -> list[Example]:
        """The answers to every prompt of the spec, generating only what is not cached (general rounded up
        to whole batches)."""
        general = -(-spec.general // spec.batch_size) * spec.batch_size
        kinds = {
            "command": ([self.command_ids(p) for p in spec.commands], [p.family for p in spec.commands]),
            "general": ([self.general_ids(spec.seed, i) for i in range(general)], [""] * general),
        }
        examples: list[Example] = []
        for kind, (prompts, families) in kinds.items():
            began = time.monotonic()
            generated = 0
            for start in range(0, len(prompts), spec.batch_size):
                chunk = prompts[start : start + spec.batch_size]
                cached = self.shard_path(kind, spec, chunk).exists()
                examples.extend(self._shard(kind, spec, chunk, families[start : start + spec.batch_size]))
                if not cached:
                    generated += len(chunk)
                    rate = generated / (time.monotonic() - began)
                    eta = (len(prompts) - start - len(chunk)) / rate
                    log(f"[data] {spec.seed} {kind}: {start + len(chunk)}/{len(prompts)} answers "
                        f"({rate:.1f}/s, about {eta / 60:.1f} min left)")
            log(f"[data] {spec.seed} {kind}: {len(prompts)} answers ready in {self.cache_dir}")
        return examples
