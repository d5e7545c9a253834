"""`speculative-vlm bench --quick`: every method runs through real processes, sockets and DDS, every
lossless output equals the target's own, and the report, CSVs and plots are written.

Tiny random models: these tests check the benchmark's plumbing and its exactness checks,
never its speed (speed is what the full benchmark measures).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from speculative_vlm.benchmark import ladder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results"
    env = dict(os.environ, ROS_DOMAIN_ID=os.environ.get("ROS_DOMAIN_ID", "42"))
    proc = subprocess.run([sys.executable, "-m", "speculative_vlm.cli", "bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=540, env=env)
    return proc, out


def _commands(out) -> list[dict]:
    with open(out / "commands.csv") as f:
        return list(csv.DictReader(f))


def test_quick_benchmark_exits_zero_and_writes_report_csvs_and_plots(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("latency_vs_rtt.png", "tokens_per_pass.png", "fleet_throughput.png", "frames.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    report = (out / "report.md").read_text()
    for heading in ("## Headline", "## Targets", "## Where the time goes", "## One process", "## The ROS hop",
                    "## Fleet"):
        assert heading in report
    assert "LOSSLESSNESS FAILED" not in report


def test_every_method_ran_at_every_rtt_and_lossless_ones_equal_the_target(quick_run):
    _, out = quick_run
    rows = _commands(out)
    robot = [r for r in rows if r["phase"] == "robot-cloud" and r["transport"] == "grpc"]
    rtts = {r["rtt_ms"] for r in robot}
    assert len(rtts) >= 2
    for rtt in rtts:
        assert {m.key for m in ladder.NETWORKED} <= {r["method"] for r in robot if r["rtt_ms"] == rtt}
    assert any(r["method"] == ladder.FREE.key for r in robot)
    assert any(r["method"] == ladder.EDGE_ONLY.key for r in rows)
    lossless = [r for r in rows if r["method"] != ladder.EDGE_ONLY.key]
    assert lossless and all(r["exact"] == "True" for r in lossless)
    auto = [r for r in robot if r["method"] == ladder.AUTO.key]
    assert auto and all(r["chosen"] in ("speculative", "cloud_ar") for r in auto)  # each session's choice recorded
    assert {"target_alone", ladder.VANILLA.key} <= {r["method"] for r in rows if r["phase"] == "inprocess"}


def test_the_ros_hop_is_measured_beside_the_same_method_without_it(quick_run):
    _, out = quick_run
    rows = _commands(out)
    ros = [r for r in rows if r["transport"] == "ros"]
    direct = [r for r in rows if r["transport"] == "grpc-ros-line"]
    assert ros and len(ros) == len(direct)
    assert {r["method"] for r in ros} == {ladder.ADAPTIVE.key}
    assert all(float(r["passes"]) > 0 for r in ros)


def test_fleet_has_batched_and_unbatched_points_whose_outputs_equal_the_target(quick_run):
    _, out = quick_run
    with open(out / "fleet.csv") as f:
        points = list(csv.DictReader(f))
    assert {(p["batched"], p["robots"]) for p in points} == {("True", "1"), ("True", "2"), ("False", "1"),
                                                              ("False", "2")}
    assert all(p["exact"] == "True" and float(p["tokens_per_s"]) > 0 for p in points)
