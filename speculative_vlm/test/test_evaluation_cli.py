"""`speculative-vlm eval --quick`: tiny models through the whole evaluation, and what it writes."""

from __future__ import annotations

import csv
import json

import pytest
from speculative_vlm.cli import main
from speculative_vlm.evaluation.episodes import FAMILIES, generate_episodes
from speculative_vlm.evaluation.families import Family
from speculative_vlm.evaluation.run import first_of_each_split, split_subset
from speculative_vlm.evaluation.splits import make_splits


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_eval_writes_the_report_csvs_and_plots(quick):
    for name in ("report.md", "episodes.csv", "steps.csv", "single_step.csv", "results.json",
                 "trajectories_expert.png", "trajectories_tiny-target_tiny-draft.png"):
        assert (quick / name).stat().st_size > 0, name
    assert (quick / "trajectories_expert.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_puts_the_policies_side_by_side_per_family_and_states_every_rule(quick):
    report = (quick / "report.md").read_text()
    assert "| metric | `expert` | `tiny-target+tiny-draft` |" in report
    assert "closed-loop success, held-out | 11/11 (100%)" in report
    assert "## Per family, train-like" in report and "## Per family, held-out" in report
    for family in Family:
        assert f"| {family.value} | " in report
    assert "Episode seed 0, split seed 0" in report


def test_every_step_of_every_episode_is_a_csv_row(quick):
    results = json.loads((quick / "results.json").read_text())
    with open(quick / "episodes.csv") as f:
        episodes = list(csv.DictReader(f))
    with open(quick / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert len(episodes) == 2 * 22
    assert len(steps) == sum(int(e["steps"]) for e in episodes)
    expert = results["policies"]["expert"]
    assert expert["heldout"]["passed"] == expert["heldout"]["episodes"] == 11
    model_steps = [s for s in steps if s["policy"] == "tiny-target+tiny-draft"]
    assert model_steps and all(s["scene_text"] for s in model_steps)
    assert all(s["progress"] for s in model_steps)  # config/sim.yaml has the drafter's progress_line on


def test_single_step_answers_are_judged_against_the_expert(quick):
    with open(quick / "single_step.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["policy"] == "tiny-target+tiny-draft" and r["expert"] for r in rows)


def test_train_episodes_sizes_the_train_like_split_alone(tmp_path):
    assert main(["eval", "--quick", "--policy", "expert", "--train-episodes", "3", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["episodes_by_split"] == {"train": 3, "heldout": 11}
    expert = results["policies"]["expert"]
    assert (expert["train"]["episodes"], expert["heldout"]["episodes"]) == (3, 11)
    assert "episodes per split: train-like 3, held-out 11" in (tmp_path / "report.md").read_text()



def test_a_policy_at_n_runs_only_the_first_n_episodes_of_each_split():
    splits = make_splits(0)
    episodes = [e for name in ("train", "heldout") for e in generate_episodes(splits[name], 11, 0, FAMILIES)]
    spec, n = split_subset("smollm2-135m-instruct+command-draft@3")
    assert (spec, n) == ("smollm2-135m-instruct+command-draft", 3)
    kept = first_of_each_split(episodes, n)
    assert [e.id for e in kept] == [e.id for e in episodes if e.split == "train"][:3] + \
        [e.id for e in episodes if e.split == "heldout"][:3]
    assert split_subset("expert") == ("expert", None) and first_of_each_split(episodes, None) == episodes
    with pytest.raises(ValueError, match="positive integer"):
        split_subset("expert@x")
