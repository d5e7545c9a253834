"""The evaluation's outputs: a markdown report, CSVs of every episode and step, trajectory grids.

``report.md`` gives, per policy side by side, closed-loop success overall and per family on the
train-like and the held-out split, single-step direction correctness on held-out prompts, the
no-motion rate on instructions the robot must not act on, each family's success rule, what the
held-out split holds out, and the failed episodes with the reason. ``episodes.csv`` has one row per
episode, ``steps.csv`` one per step (prompt, text, command, what ran, pose before and after),
``single_step.csv`` one per single-step answer, ``results.json`` the summary numbers, and
``trajectories_<policy>.png`` a grid of top-down plots (:func:`~speculative_vlm.evaluation.plots.plot_topdown`).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from speculative_vlm.commands.grammar import command_text
from speculative_vlm.evaluation.families import RULES, Family
from speculative_vlm.evaluation.phrasings import HELDOUT, TRAIN
from speculative_vlm.evaluation.runner import EpisodeResult
from speculative_vlm.evaluation.single_step import Answer

SPLIT_NAMES = {TRAIN: "train-like", HELDOUT: "held-out"}


def slug(name: str) -> str:
    """A file-name-safe form of a policy name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:60] or "policy"


def rate(results: Sequence[EpisodeResult]) -> tuple[int, int]:
    return sum(r.success for r in results), len(results)


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "-"


def summary(results: dict[str, list[EpisodeResult]], single: dict[str, list[Answer]]) -> dict:
    """The headline numbers per policy (what results.json holds)."""
    out = {}
    for name, rs in results.items():
        entry: dict = {}
        for split in (TRAIN, HELDOUT):
            sel = [r for r in rs if r.episode.split == split]
            k, n = rate(sel)
            fam = {}
            for family in Family:
                fk, fn = rate([r for r in sel if r.episode.intent.family == family])
                if fn:
                    fam[family.value] = {"passed": fk, "episodes": fn}
            entry[split] = {"passed": k, "episodes": n, "families": fam}
        refuse = [r for r in rs if r.episode.intent.family == Family.REFUSE]
        entry["no_motion_on_refuse"] = {"passed": sum(r.success for r in refuse), "episodes": len(refuse)}
        answers = single.get(name, [])
        entry["single_step"] = {"correct": sum(a.correct for a in answers), "answers": len(answers),
                                "main_axis": sum(a.main_axis for a in answers)}
        out[name] = entry
    return out


def write_report(
    out: Path,
    results: dict[str, list[EpisodeResult]],
    single: dict[str, list[Answer]],
    meta: dict,
    graph: Sequence[dict] = (),
) -> Path:
    """Write every output into ``out`` (created if missing); returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    numbers = summary(results, single)
    (out / "results.json").write_text(json.dumps({"meta": meta, "policies": numbers, "graph": list(graph)},
                                                 indent=2, default=str))
    _episodes_csv(out / "episodes.csv", results)
    _steps_csv(out / "steps.csv", results)
    _single_csv(out / "single_step.csv", single)
    plots = {name: _trajectory_grid(out / f"trajectories_{slug(name)}.png", rs, name) for name, rs in results.items()}
    path = out / "report.md"
    path.write_text(_markdown(results, single, numbers, meta, plots, graph))
    return path


# ---- markdown -------------------------------------------------------------------------------
def _split_episodes(meta: dict, split: str) -> int:
    """Episodes of one split (``--train-episodes`` may give the train-like split fewer)."""
    return int(meta.get("episodes_by_split", {}).get(split, meta.get("episodes", 0)))


def _markdown(results, single, numbers, meta, plots, graph) -> str:
    names = list(results)
    lines = ["# Closed-loop evaluation: does the robot do what it is told?", ""]
    lines.append(
        f"Run {meta.get('date', '')}, {meta.get('minutes', '?')} min, {meta.get('mode', 'full')} mode. "
        f"Episode seed {meta.get('seed')}, split seed {meta.get('split_seed')}; episodes per split: "
        f"{', '.join(f'{SPLIT_NAMES[s]} {_split_episodes(meta, s)}' for s in meta.get('splits', []))}; "
        f"families dealt in turn. "
        f"Motion limits of `{meta.get('config')}` (vx {meta.get('limits', {}).get('min_vx')}.."
        f"{meta.get('limits', {}).get('max_vx')} m/s, |vy| <= {meta.get('limits', {}).get('max_vy')} m/s, "
        f"|vyaw| <= {meta.get('limits', {}).get('max_vyaw')} rad/s), camera frames at "
        f"{meta.get('frame_size')} as the camera node publishes them. Progress line in the prompts: "
        f"{'on' if meta.get('progress_line', True) else 'off'}.")
    lines.append("")
    lines.append("Every step runs the robot's command path: the policy's text -> the command parser -> the motion "
                 "node's limits -> the simulated Go2's dynamics (in-process, on a manual clock). Model policies "
                 "decode the robot's own prompt (system prompt, instruction, scene text described from the camera "
                 "frame and, when the progress line is on, the odometry since the instruction and the last command) "
                 "under the command grammar with the project's engine.")
    lines.append("")
    lines.append("Policies:")
    for name in names:
        lines.append(f"- `{name}`: {meta.get('policies', {}).get(name, '')}")
    lines.append("")
    lines.append("## Side by side")
    lines.append("")
    lines.append("| metric | " + " | ".join(f"`{n}`" for n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for split in meta.get("splits", []):
        row = [_pct(numbers[n][split]["passed"], numbers[n][split]["episodes"]) for n in names]
        lines.append(f"| closed-loop success, {SPLIT_NAMES[split]} | " + " | ".join(row) + " |")
    if any(numbers[n]["single_step"]["answers"] for n in names):
        row = [_pct(numbers[n]["single_step"]["correct"], numbers[n]["single_step"]["answers"])
               if numbers[n]["single_step"]["answers"] else "-" for n in names]
        lines.append("| single-step direction correctness, held-out | " + " | ".join(row) + " |")
        row = [_pct(numbers[n]["single_step"]["main_axis"], numbers[n]["single_step"]["answers"])
               if numbers[n]["single_step"]["answers"] else "-" for n in names]
        lines.append("| single-step, main axis only (looser), held-out | " + " | ".join(row) + " |")
    row = [_pct(numbers[n]["no_motion_on_refuse"]["passed"], numbers[n]["no_motion_on_refuse"]["episodes"])
           for n in names]
    lines.append("| no motion on instructions it must not act on | " + " | ".join(row) + " |")
    row = [_mean_steps(results[n]) for n in names]
    lines.append("| mean steps per episode | " + " | ".join(row) + " |")
    row = [_mean_seconds(results[n]) for n in names]
    lines.append("| mean decoding time per step | " + " | ".join(row) + " |")
    lines.append("")
    for split in meta.get("splits", []):
        lines.append(f"## Per family, {SPLIT_NAMES[split]}")
        lines.append("")
        lines.append("| family | " + " | ".join(f"`{n}`" for n in names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for family in Family:
            fam = [numbers[n][split]["families"].get(family.value) for n in names]
            if not any(fam):
                continue
            lines.append(f"| {family.value} | " + " | ".join(_pct(f["passed"], f["episodes"]) if f else "-"
                                                            for f in fam) + " |")
        lines.append("")
    lines.append("## Success rules")
    lines.append("")
    lines.append("| family | an episode succeeds when |")
    lines.append("|---|---|")
    for family, rule in RULES.items():
        lines.append(f"| {family.value} | {rule} |")
    lines.append("")
    lines.append("Every episode also ends like a goal of the drafter node: `done` ends it, text that is not a "
                 "command ends it (`invalid`, the robot is stopped), an empty instruction is refused before any "
                 "step (`refused`), and otherwise the family's step limit ends it (`step_limit`).")
    lines.append("")
    lines.append("Single-step direction correctness: every step of the expert's rollouts of held-out episodes is "
                 "one prompt; a policy answers it once, and the answer counts when it has the expert's action and, "
                 "for a move, the expert's sign on every axis the expert uses (|vx|, |vy| >= 0.1 m/s, |vyaw| >= "
                 "0.2 rad/s) and no motion on the axes it leaves still (forward speed is allowed while turning "
                 "towards an object the robot is going to). The looser main-axis figure asks only for the "
                 "expert's action and, for a move, the sign of the axis the expert uses most.")
    lines.append("")
    held = meta.get("heldout", {})
    if held:
        lines.append("## What the held-out split holds out")
        lines.append("")
        lines.append(f"- colour/shape combinations no training scene contains: {', '.join(held.get('combos', []))}")
        lines.append(f"- scene layouts: train-like {', '.join(held.get('train_layouts', []))}; held-out "
                     f"{', '.join(held.get('layouts', []))}")
        lines.append("- wording: other templates per family (verbs, synonyms such as sphere/cube/pylon/violet, word "
                     "order), other styles (ALL CAPS, Title Case, 'could you ...?', '..., thanks!') and other typos "
                     "(swapped or doubled letters; training drops one)")
        lines.append("")
    if graph:
        lines.append("## Through the ROS graph")
        lines.append("")
        lines.append("Each episode ran again as `speculative-vlm up` runs the robot: the simulated Go2 and a local "
                     "verifier as separate processes, the camera, motion, bridge and drafter nodes over real DDS, "
                     "the instruction as an `Instruct` goal; judged by the same rule from the simulator's own state. "
                     "The graph runs in real time: the drafter takes the newest camera frame (5 Hz) once the motion "
                     "node reports idle, which can show the robot before it came to rest, so a scene line can read a "
                     "tenth of a metre or a few degrees off the in-process one (rendered at rest); a model whose "
                     "answer turns on such details then takes another path from that step on.")
        lines.append("")
        lines.append("| episode | family | instruction | in-process | graph | same verdict | same commands | "
                     "end poses apart |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for g in graph:
            gap = f"{g['end_gap_m']} m" if g["end_gap_m"] != "-" else "-"
            lines.append(f"| {g['episode']} | {g['family']} | {g['instruction']} | {g['inprocess']} | {g['graph']} | "
                         f"{'yes' if g.get('same_verdict', g['same']) else 'no'} | first "
                         f"{g.get('same_prefix', '?')} of {g['inprocess_steps']} / {g['graph_steps']} steps | {gap} |")
        lines.append("")
    lines.append("## Trajectories")
    lines.append("")
    for name, png in plots.items():
        if png is not None:
            lines.append(f"`{name}`: ![{name}]({png.name})")
            lines.append("")
    lines.append("## Failed episodes")
    lines.append("")
    for name in names:
        failed = [r for r in results[name] if not r.success]
        lines.append(f"`{name}`: {len(failed)} failed" + (":" if failed else "."))
        lines.append("")
        for r in failed[:40]:
            last = r.steps[-1].text if r.steps else ""
            lines.append(f"- {r.episode.id} {r.episode.intent.family.value} \"{r.episode.instruction}\": {r.why} "
                         f"({len(r.steps)} steps; last text `{last}`)")
        if len(failed) > 40:
            lines.append(f"- ... {len(failed) - 40} more in episodes.csv")
        lines.append("")
    lines.append(f"Command: `{meta.get('command', '')}`")
    lines.append("")
    return "\n".join(lines)


def _mean_steps(results: Sequence[EpisodeResult]) -> str:
    return f"{sum(len(r.steps) for r in results) / len(results):.1f}" if results else "-"


def _mean_seconds(results: Sequence[EpisodeResult]) -> str:
    steps = [s for r in results for s in r.steps]
    return f"{sum(s.seconds for s in steps) / len(steps):.2f} s" if steps else "-"


# ---- CSV -----------------------------------------------------------------------------------
def _episodes_csv(path: Path, results: dict[str, list[EpisodeResult]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "episode", "split", "family", "layout", "instruction", "ended", "steps", "success",
                    "why", "final_x", "final_y", "final_yaw", "final_mode", "forward_m", "left_m", "turned_deg",
                    "max_offset_m"])
        for name, rs in results.items():
            for r in rs:
                e = r.episode
                w.writerow([name, e.id, e.split, e.intent.family.value, e.layout, e.instruction, r.ended,
                            len(r.steps), int(r.success), r.why, f"{r.final.x:.3f}", f"{r.final.y:.3f}",
                            f"{r.final.yaw:.3f}", r.final_mode.name, f"{r.forward:.3f}", f"{r.left:.3f}",
                            f"{math.degrees(r.turned):.1f}", f"{r.max_offset:.3f}"])


def _steps_csv(path: Path, results: dict[str, list[EpisodeResult]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "episode", "split", "family", "instruction", "step", "x", "y", "yaw", "mode",
                    "scene_text", "progress", "text", "action", "vx", "vy", "vyaw", "duration", "run_vx", "run_vy",
                    "run_vyaw", "run_duration", "x_after", "y_after", "yaw_after", "mode_after", "seconds",
                    "tokens", "acceptance"])
        for name, rs in results.items():
            for r in rs:
                e = r.episode
                for s in r.steps:
                    c, x = s.command, s.executed
                    w.writerow([
                        name, e.id, e.split, e.intent.family.value, e.instruction, s.step, f"{s.pose.x:.3f}",
                        f"{s.pose.y:.3f}", f"{s.pose.yaw:.3f}", s.mode.name, s.scene_text, s.progress, s.text,
                        c.action.value if c else "", *(f"{getattr(c, k):.1f}" if c else "" for k in
                                                       ("vx", "vy", "vyaw", "duration")),
                        *(f"{getattr(x, k):.2f}" if x else "" for k in ("vx", "vy", "vyaw", "duration")),
                        f"{s.pose_after.x:.3f}", f"{s.pose_after.y:.3f}", f"{s.pose_after.yaw:.3f}", s.mode_after.name,
                        f"{s.seconds:.3f}", s.tokens, "" if s.acceptance is None else f"{s.acceptance:.3f}",
                    ])


def _single_csv(path: Path, single: dict[str, list[Answer]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "episode", "family", "step", "instruction", "prompt", "expert", "answer", "correct",
                    "main_axis", "seconds"])
        for name, answers in single.items():
            for a in answers:
                st = a.state
                w.writerow([name, st.episode.id, st.episode.intent.family.value, st.observation.step,
                            st.episode.instruction, st.observation.prompt(), command_text(st.expert), a.text,
                            int(a.correct), int(a.main_axis), f"{a.seconds:.3f}"])


# ---- plots ----------------------------------------------------------------------------------
def pick_for_grid(results: Sequence[EpisodeResult], per_family: int = 2) -> list[EpisodeResult]:
    """Up to ``per_family`` episodes of each family and split, failures first (the ones worth a look)."""
    picked = []
    for split in (TRAIN, HELDOUT):
        for family in Family:
            sel = [r for r in results if r.episode.split == split and r.episode.intent.family == family]
            sel.sort(key=lambda r: r.success)
            picked += sel[:per_family]
    return picked


def _trajectory_grid(path: Path, results: Sequence[EpisodeResult], name: str, columns: int = 6) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from speculative_vlm.evaluation.plots import plot_topdown
    from speculative_vlm.go2.scene import SceneObject

    picked = pick_for_grid(results)
    if not picked:
        return None
    rows = math.ceil(len(picked) / columns)
    fig = Figure(figsize=(3.4 * columns, 3.3 * rows))
    FigureCanvasAgg(fig)
    for i, r in enumerate(picked):
        ax = fig.add_subplot(rows, columns, i + 1)
        e = r.episode
        objects = [SceneObject(o.name.removeprefix("the "), o.shape, o.colour, o.x, o.y, o.size) for o in e.scene.objects]
        goal = next((o for o in objects if o.name == e.intent.target), None)
        mark = "ok" if r.success else "FAIL"
        title = f"{mark} {e.id} {e.intent.family.value}\n\"{e.instruction[:38]}\""
        plot_topdown(ax, [(p[0], p[1]) for p in r.path], objects, goal, title=title, end_yaw=r.final.yaw)
        ax.set_title(title, fontsize=7, color="black" if r.success else "tab:red")
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(labelsize=6)
        for text in ax.texts:
            text.set_fontsize(6)
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
    fig.suptitle(f"{name}: top-down trajectories (green start, red end, dashed ring the named object)", fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.03, top=1 - 0.35 / rows, wspace=0.25, hspace=0.45)
    fig.savefig(path, dpi=80, format="png")
    return path
