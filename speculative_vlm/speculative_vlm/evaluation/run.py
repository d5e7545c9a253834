"""`speculative-vlm eval`: closed-loop episodes in the simulated Go2; writes the report, CSVs and plots.

    speculative-vlm eval                      # expert + stock SmolLM2 (with the shipped draft), both splits
    speculative-vlm eval --policy expert --policy my-target+command-draft --episodes 110
    speculative-vlm eval --quick              # tiny random models, one episode per family; the test suite runs it

A policy is ``expert`` (the scripted expert), ``TARGET`` (a model decoding alone), ``TARGET+DRAFT``
(speculative decoding, same output, faster), each a folder or a model-store name; prefix
``image:`` for a VLM target that reads the camera frame instead of the scene text. Several
policies go side by side in one report. ``--graph N`` also runs N held-out episodes of the last
model policy (or the expert) through the full ROS graph (``speculative-vlm up``'s nodes, the
simulated Go2 and a verifier as separate processes) and reports whether they end as in-process.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", action="append", default=None,
                        help="'expert', 'TARGET', 'TARGET+DRAFT' or 'image:TARGET[+DRAFT]'; repeat to compare "
                             f"(default: {' and '.join(DEFAULT_POLICIES)}; --quick: expert and tiny random models)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny random models (at most {QUICK_MODEL_STEPS} steps an episode), one episode per "
                             "family and split (CI)")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per split (default 66; --quick 11)")
    parser.add_argument("--split", choices=("both", TRAIN, HELDOUT), default="both", help="which split(s) to run")
    parser.add_argument("--families", default="", help=f"comma-separated families (default all: "
                                                        f"{','.join(f.value for f in FAMILIES)})")
    parser.add_argument("--seed", type=int, default=0, help="episode seed")
    parser.add_argument("--split-seed", type=int, default=0, help="which colour/shape combinations are held out")
    parser.add_argument("--single-step", type=int, default=None,
                        help="held-out prompts for single-step direction correctness per model policy "
                             "(default 100; --quick 4; 0 = skip)")
    parser.add_argument("--max-steps", type=int, default=0, help="cap every episode's step limit (0: the family's)")
    parser.add_argument("--graph", type=int, default=0, help="also run N held-out episodes through the ROS graph")
    parser.add_argument("--config", type=Path, default=SIM_CONFIG,
                        help="bringup config whose motion limits and camera size apply (default config/sim.yaml)")
    parser.add_argument("--progress-line", choices=("config", "on", "off"), default="config",
                        help="tell the models their odometry each step, as the drafter's progress_line does "
                             "(default: the config's drafter section)")
    parser.add_argument("--draft-length", type=int, default=4, help="draft tokens per block")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {DEFAULT_OUT}; --quick: a temporary folder)")


def make_policy(spec: str, config: WorldConfig, draft_length: int = 4, name: str = "") -> Policy:
    """A policy from its command-line spec (see the module docstring)."""
    if spec == "expert":
        return ExpertPolicy(config.limits)
    perception = "scene_text"
    if spec.startswith("image:"):
        perception, spec = "image", spec.removeprefix("image:")
    target, _, draft = spec.partition("+")
    return ModelPolicy(target, draft or None, perception=perception, name=name or spec, draft_length=draft_length)


def _describe(policy: Policy) -> str:
    if isinstance(policy, ExpertPolicy):
        return "the scripted expert (ground truth, geometric planner)"
    how = f"speculative decoding with draft `{policy.draft.name}`" if policy.draft is not None else "the target alone"
    return f"target `{policy.target.name}` ({policy.perception} perception), {how}, command grammar, greedy"


def run(args: argparse.Namespace) -> int:
    from speculative_vlm.evaluation.report import write_report
    from speculative_vlm.evaluation.single_step import answer_states, expert_states

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    config = WorldConfig.from_config(args.config)
    if args.progress_line != "config":
        config = replace(config, progress_line=args.progress_line == "on")
    episodes_per_split = args.episodes if args.episodes is not None else (11 if args.quick else 66)
    single_n = args.single_step if args.single_step is not None else (4 if args.quick else 100)
    families = tuple(Family(f.strip()) for f in args.families.split(",") if f.strip()) or FAMILIES
    scratch = Path(tempfile.mkdtemp(prefix="speculative_vlm_eval_")) if args.quick else None
    specs = list(args.policy or [])
    names: dict[str, str] = {}
    if not specs and args.quick:
        from speculative_vlm.benchmark.quick_models import build

        target, draft = build(scratch)
        specs = ["expert", f"{target}+{draft}"]
        names[specs[1]] = "tiny-target+tiny-draft"
    specs = specs or list(DEFAULT_POLICIES)
    out = args.out or (scratch / "results" if args.quick else DEFAULT_OUT)

    splits = make_splits(args.split_seed)
    run_splits = (TRAIN, HELDOUT) if args.split == "both" else (args.split,)
    episodes = [e for s in run_splits for e in generate_episodes(splits[s], episodes_per_split, args.seed, families)]
    if args.max_steps:
        episodes = [replace(e, max_steps=min(e.max_steps, args.max_steps)) for e in episodes]
    results: dict[str, list[EpisodeResult]] = {}
    single: dict = {}
    descriptions: dict[str, str] = {}
    states = None
    last_model = None
    ran: dict[str, list] = {}  # spec -> the episodes it ran (--quick caps a model's steps)
    try:
        for spec in specs:
            policy = make_policy(spec, config, args.draft_length, names.get(spec, ""))
            descriptions[policy.name] = _describe(policy)
            _progress(f"policy {policy.name}: {len(episodes)} episodes")
            rs = results.setdefault(policy.name, [])
            policy_episodes = episodes
            if args.quick and isinstance(policy, ModelPolicy):  # tiny random models never say done
                policy_episodes = [replace(e, max_steps=min(e.max_steps, QUICK_MODEL_STEPS)) for e in episodes]
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
        if args.graph:
            from speculative_vlm.evaluation.graph import run_graph_episodes

            spec = last_model or "expert"
            held = [e for e in ran.get(spec, episodes) if e.split == HELDOUT and e.instruction.strip()][: args.graph]
            _progress(f"graph: {len(held)} held-out episodes of {names.get(spec, spec)} through the ROS graph")
            graph_rows = run_graph_episodes(held, spec, args.config, results.get(names.get(spec, spec), []),
                                            names.get(spec, ""), progress_line=config.progress_line)
            for row in graph_rows:
                _progress(f"  {row['episode']} in-process {row['inprocess']}; graph {row['graph']}; same commands for "
                          f"the first {row['same_prefix']} steps ({row['wall_s']} s)")
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "minutes": round((time.monotonic() - t0) / 60, 1),
            "mode": "quick" if args.quick else "full",
            "seed": args.seed, "split_seed": args.split_seed, "episodes": episodes_per_split,
            "splits": list(run_splits), "families": [f.value for f in families],
            "config": str(args.config.relative_to(PACKAGE_ROOT) if args.config.is_relative_to(PACKAGE_ROOT)
                          else args.config),
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="speculative-vlm eval")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
