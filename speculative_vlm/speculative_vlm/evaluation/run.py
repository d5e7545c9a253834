"""`speculative-vlm eval`: closed-loop episodes in the simulated Go2; writes the report, CSVs and plots.

    speculative-vlm eval                      # expert + stock SmolLM2 (with the shipped draft), both splits
    speculative-vlm eval --policy expert --policy my-target+command-draft --episodes 110
    speculative-vlm eval --quick              # tiny random models, one episode per family; the test suite runs it

A policy is ``expert`` (the scripted expert), ``TARGET`` (a model decoding alone), ``TARGET+DRAFT``
(speculative decoding, same output, faster), each a folder or a model-store name; prefix
``image:`` for a VLM target that reads the camera frame instead of the scene text (its text draft
reads the scene text), or ``image~N:`` for the same with N grey levels of Gaussian noise added to
every frame (noisier than any training frame: those have at most 9). Several
policies go side by side in one report. ``--graph N`` also runs N held-out episodes of the last
model policy (or the expert) through the full ROS graph (``speculative-vlm up``'s nodes, the
simulated Go2 and a verifier as separate processes) and reports whether they end as in-process.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from speculative_vlm.evaluation.episodes import FAMILIES, generate_episodes
from speculative_vlm.evaluation.families import Family
from speculative_vlm.evaluation.phrasings import HELDOUT, TRAIN
from speculative_vlm.evaluation.policies import ExpertPolicy, ModelPolicy, Policy
from speculative_vlm.evaluation.runner import EpisodeResult, run_episode
from speculative_vlm.evaluation.splits import TRAIN_LAYOUTS, make_splits
from speculative_vlm.evaluation.world import SIM_CONFIG, WorldConfig

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # speculative_vlm/ (the ament package)
DEFAULT_OUT = PACKAGE_ROOT / "eval" / "results"
DEFAULT_POLICIES = ("expert", "smollm2-135m-instruct+command-draft")
QUICK_MODEL_STEPS = 2  # --quick: step limit of model policies (tiny random models never say done)


@dataclass(frozen=True)
class EvalOptions:
    """What to run (``speculative-vlm eval`` sets each from its flag of the same name; its help says more)."""

    policy: list[str] | None = None  # policy specs (see the module docstring); None: DEFAULT_POLICIES
    quick: bool = False  # tiny random models, QUICK_MODEL_STEPS steps an episode, one episode per family
    episodes: int | None = None  # per split (None: 66; quick 11)
    train_episodes: int | None = None  # of the train-like split (None: as ``episodes``)
    split: str = "both"  # "both", TRAIN or HELDOUT
    families: str = ""  # comma-separated family names ("": all)
    seed: int = 0  # episode seed
    split_seed: int = 0  # which colour/shape combinations are held out
    single_step: int | None = None  # held-out single-step prompts per model policy (None: 100; quick 4; 0: skip)
    max_steps: int = 0  # cap on every episode's step limit (0: the family's)
    graph: int = 0  # also run this many held-out episodes through the ROS graph
    config: Path = SIM_CONFIG  # bringup config whose motion limits and camera size apply
    progress_line: str = "config"  # "config" (the drafter section's), "on" or "off"
    draft_length: int = 4  # draft tokens per block
    threads: int = 0  # torch threads (0: torch's default)
    out: Path | None = None  # results folder (None: DEFAULT_OUT; quick: a temporary folder)


def make_policy(spec: str, config: WorldConfig, draft_length: int = 4, name: str = "") -> Policy:
    """A policy from its command-line spec (see the module docstring)."""
    if spec == "expert":
        return ExpertPolicy(config.limits)
    perception, noise, full = "scene_text", 0.0, spec
    head, colon, rest = spec.partition(":")
    if colon and head.split("~")[0] == "image":
        perception, spec = "image", rest
        if "~" in head:  # image~N: frames with N grey levels of extra noise
            try:
                noise = float(head.split("~", 1)[1])
            except ValueError:
                raise ValueError(f"policy {full}: the noise after 'image~' must be a number of grey levels") from None
    target, _, draft = spec.partition("+")
    return ModelPolicy(target, draft or None, perception=perception, name=name or full, draft_length=draft_length,
                       frame_noise=noise)


def _describe(policy: Policy) -> str:
    if isinstance(policy, ExpertPolicy):
        return "the scripted expert (ground truth, geometric planner)"
    how = f"speculative decoding with draft `{policy.draft.name}`" if policy.draft is not None else "the target alone"
    noise = f", frames with Gaussian noise of {policy.frame_noise:g} grey levels added" if policy.frame_noise else ""
    return f"target `{policy.target.name}` ({policy.perception} perception{noise}), {how}, command grammar, greedy"


def split_subset(spec: str) -> tuple[str, int | None]:
    """``SPEC@N`` -> (SPEC, N): a slow baseline runs only the first N episodes of each split."""
    spec, at, n = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if not at:
        return spec, None
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"policy {spec}@{n}: the episode count after '@' must be a positive integer")
    return spec, int(n)


def first_of_each_split(episodes: list, n: int | None) -> list:
    """The first ``n`` episodes of each split (families are dealt in turn, so they stay balanced)."""
    if n is None:
        return episodes
    seen: dict[str, int] = {}
    kept = []
    for e in episodes:
        seen[e.split] = seen.get(e.split, 0) + 1
        if seen[e.split] <= n:
            kept.append(e)
    return kept


def run_evaluation(options: EvalOptions) -> int:
    """Run the episodes (and single-step prompts, and graph episodes), write the report to ``options.out``."""
    from speculative_vlm.evaluation.report import write_report
    from speculative_vlm.evaluation.single_step import answer_states, expert_states

    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    t0 = time.monotonic()
    config = WorldConfig.from_config(options.config)
    if options.progress_line != "config":
        config = replace(config, progress_line=options.progress_line == "on")
    episodes_per_split = options.episodes if options.episodes is not None else (11 if options.quick else 66)
    single_n = options.single_step if options.single_step is not None else (4 if options.quick else 100)
    families = tuple(Family(f.strip()) for f in options.families.split(",") if f.strip()) or FAMILIES
    scratch = Path(tempfile.mkdtemp(prefix="speculative_vlm_eval_")) if options.quick else None
    specs = list(options.policy or [])
    names: dict[str, str] = {}
    if not specs and options.quick:
        from speculative_vlm.benchmark.quick_models import build

        target, draft = build(scratch)
        specs = ["expert", f"{target}+{draft}"]
        names[specs[1]] = "tiny-target+tiny-draft"
    specs = specs or list(DEFAULT_POLICIES)
    out = options.out or (scratch / "results" if options.quick else DEFAULT_OUT)

    splits = make_splits(options.split_seed)
    run_splits = (TRAIN, HELDOUT) if options.split == "both" else (options.split,)
    per_split = {s: episodes_per_split for s in run_splits}
    if options.train_episodes is not None and TRAIN in per_split:
        per_split[TRAIN] = options.train_episodes
    episodes = [e for s in run_splits for e in generate_episodes(splits[s], per_split[s], options.seed, families)]
    if options.max_steps:
        episodes = [replace(e, max_steps=min(e.max_steps, options.max_steps)) for e in episodes]
    results: dict[str, list[EpisodeResult]] = {}
    single: dict = {}
    descriptions: dict[str, str] = {}
    states = None
    last_model = None
    ran: dict[str, list] = {}  # spec -> the episodes it ran (--quick caps a model's steps)
    try:
        for full_spec in specs:
            spec, subset = split_subset(full_spec)
            policy = make_policy(spec, config, options.draft_length, names.get(full_spec, ""))
            descriptions[policy.name] = _describe(policy) + (
                f" (only the first {subset} episodes of each split: a slow baseline)" if subset else "")
            policy_episodes = first_of_each_split(episodes, subset)
            _progress(f"policy {policy.name}: {len(policy_episodes)} episodes")
            rs = results.setdefault(policy.name, [])
            if options.quick and isinstance(policy, ModelPolicy):  # tiny random models never say done
                policy_episodes = [replace(e, max_steps=min(e.max_steps, QUICK_MODEL_STEPS)) for e in policy_episodes]
            ran[spec] = policy_episodes
            for episode in policy_episodes:
                r = run_episode(episode, policy, config)
                rs.append(r)
                _progress(f"  {episode.id} {episode.intent.family.value:9s} {'ok  ' if r.success else 'FAIL'} "
                          f"{len(r.steps):2d} steps  {episode.instruction!r}: {r.why}")
            if isinstance(policy, ModelPolicy) and single_n and HELDOUT in run_splits:
                if states is None:
                    held = [e for e in episodes if e.split == HELDOUT]
                    states = expert_states(held, config, single_n)
                _progress(f"  single-step: {len(states)} held-out prompts")
                single[policy.name] = answer_states(policy, states)
                last_model = spec
            policy.close()
        graph_rows = []
        if options.graph:
            from speculative_vlm.evaluation.graph import run_graph_episodes

            spec = last_model or "expert"
            held = [e for e in ran.get(spec, episodes) if e.split == HELDOUT and e.instruction.strip()][: options.graph]
            _progress(f"graph: {len(held)} held-out episodes of {names.get(spec, spec)} through the ROS graph")
            graph_rows = run_graph_episodes(held, spec, options.config, results.get(names.get(spec, spec), []),
                                            names.get(spec, ""), progress_line=config.progress_line)
            for row in graph_rows:
                _progress(f"  {row['episode']} in-process {row['inprocess']}; graph {row['graph']}; same commands for "
                          f"the first {row['same_prefix']} steps ({row['wall_s']} s)")
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "minutes": round((time.monotonic() - t0) / 60, 1),
            "mode": "quick" if options.quick else "full",
            "seed": options.seed, "split_seed": options.split_seed, "episodes": episodes_per_split, "episodes_by_split": per_split,
            "splits": list(run_splits), "families": [f.value for f in families],
            "config": str(options.config.relative_to(PACKAGE_ROOT) if options.config.is_relative_to(PACKAGE_ROOT)
                          else options.config),
            "limits": asdict(config.limits),
            "frame_size": f"{config.frame_size[0]}x{config.frame_size[1]}",
            "progress_line": config.progress_line,
            "policies": descriptions,
            "heldout": {"combos": list(splits[HELDOUT].target_combos), "layouts": list(splits[HELDOUT].layouts),
                        "train_layouts": list(TRAIN_LAYOUTS)},
            "command": "speculative-vlm eval " + " ".join(shlex.quote(a) for a in sys.argv[2:])
            if len(sys.argv) > 1 and sys.argv[1] == "eval" else "speculative-vlm eval",
        }
        path = write_report(out, results, single, meta, graph_rows)
        _progress(f"report written to {path}")
        for name, rs in results.items():
            for split in run_splits:
                sel = [r for r in rs if r.episode.split == split]
                _progress(f"  {name} {split}: {sum(r.success for r in sel)}/{len(sel)} episodes succeeded")
            if name in single:
                answers = single[name]
                _progress(f"  {name} single-step direction: {sum(a.correct for a in answers)}/{len(answers)}")
    finally:
        if scratch is not None:  # the tiny models; a --quick results folder inside it stays for a look
            for folder in ("target", "draft"):
                shutil.rmtree(scratch / folder, ignore_errors=True)
    return 0


def _progress(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)
