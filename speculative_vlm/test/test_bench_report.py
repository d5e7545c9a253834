"""The benchmark's judgement: lost exactness fails the run, and the report says plainly which
targets are missed. Synthetic measurements, so each verdict is known in advance."""

from __future__ import annotations

from speculative_vlm.benchmark import ladder, report
from speculative_vlm.benchmark.fleet import percentile


def _row(method: str, wall: float, rtt: float | None = 20.0, transport: str = "grpc", exact: bool = True,
         prompt: int = 0) -> dict:
    return {"method": method, "wall_s": wall, "open_s": 0.1, "tokens": 40, "passes": 10, "drafted": 40,
            "accepted": 30, "draft_s": 0.2, "verify_s": 0.5, "wait_s": 0.9, "early_hits": 1, "early_misses": 1,
            "early_low": 0, "exact": exact, "first_divergence": -1 if exact else 7, "rtt_ms": rtt,
            "transport": transport, "prompt": prompt, "text": "{}"}


def _results(robot: list[dict], fleet: list[dict] | None = None, inprocess: list[dict] | None = None) -> dict:
    meta = {"rtts_ms": [20, 60], "fleet_sizes": [1, 8], "quick": True, "target": "t", "draft": "d",
            "draft_dtype": None, "stand_in": False, "prompts": 1, "max_new_tokens": 64, "exit_layers": [2],
            "exit_heads": None, "target_layers": 4, "robot_cores": [0], "cloud_cores": [1], "bandwidth_mbps": 20,
            "jitter_ms": 0, "started_utc": "now", "minutes": 0.1, "inprocess_threads": 2, "inprocess_cores": [0, 1],
            "ros_rtt_ms": 20, "fleet_rtt_ms": 20, "fleet_max_wait_ms": 10, "fleet_commands_per_robot": 1,
            "fleet_load": {"gamma": 4, "acceptance": 0.7, "draft_s_per_token": 0.01},
            "prompt_list": [{"index": 0, "instruction": "sit", "scene_text": "nothing"}]}
    return {"meta": meta, "robot": robot, "inprocess": inprocess or [], "fleet": fleet or [],
            "references": {"0": {"command_text": "{}"}}}


def test_a_lossless_method_that_differs_from_the_target_is_a_failure_naming_method_and_position():
    results = _results([_row(ladder.PIPELINE.key, 1.0, exact=False), _row(ladder.CLOUD_AR.key, 2.0)])
    failures = report.exactness_failures(results)
    assert len(failures) == 1
    assert ladder.PIPELINE.key in failures[0] and "token 7" in failures[0]
    assert "LOSSLESSNESS FAILED" in report.markdown(results)


def test_the_unverified_edge_only_baseline_may_differ_without_failing():
    results = _results([_row(ladder.EDGE_ONLY.key, 0.5, rtt=None, transport="none", exact=False)])
    assert report.exactness_failures(results) == []


def test_a_fleet_point_that_loses_exactness_is_a_failure():
    point = {"batched": True, "robots": 8, "exact": False, "tokens_per_s": 1.0}
    assert report.exactness_failures(_results([], fleet=[point]))


def _check(results: dict, prefix: str) -> report.Check:
    return next(c for c in report.targets(results) if c.name.startswith(prefix))


def test_latency_target_is_met_at_35_percent_below_cloud_ar_and_missed_above():
    fast = _results([_row(ladder.CLOUD_AR.key, 2.0), _row(ladder.PIPELINE.key, 1.2)])
    slow = _results([_row(ladder.CLOUD_AR.key, 2.0), _row(ladder.PIPELINE.key, 1.4)])
    assert _check(fast, "spec + early exits + pipelining vs cloud AR at 20").met is True
    assert _check(slow, "spec + early exits + pipelining vs cloud AR at 20").met is False
    assert _check(slow, "spec + early exits + pipelining vs cloud AR at 60").met is None  # not measured


def test_a_slower_method_is_reported_as_higher_latency_not_negative_lower():
    check = _check(_results([_row(ladder.CLOUD_AR.key, 1.0), _row(ladder.PIPELINE.key, 2.0)]), "spec + early")
    assert "higher" in check.measured and "-" not in check.measured


def test_fleet_target_compares_eight_batched_with_eight_unbatched():
    fleet = [{"batched": b, "robots": 8, "tokens_per_s": t, "exact": True} for b, t in ((True, 300.0), (False, 100.0))]
    check = _check(_results([], fleet=fleet), "8 batched")
    assert check.met is True and check.measured == "3.00x"


def test_ros_hop_target_uses_the_interleaved_direct_line():
    rows = [_row(ladder.ADAPTIVE.key, 1.0, transport="grpc-ros-line"), _row(ladder.ADAPTIVE.key, 1.1, transport="ros")]
    check = _check(_results(rows), "the ROS hop")
    assert check.met is False and "+10.0%" in check.measured


def test_summary_gives_the_physical_bound_per_round():
    s = report.summarize([_row(ladder.PIPELINE.key, 1.0)])
    # gamma 4 tokens at 5 ms each + 20 ms RTT = 40 ms against V = 50 ms per round.
    assert abs(s.bound_per_round(0.020) - 0.050) < 1e-9
    assert abs(s.serial_per_round(0.020) - 0.090) < 1e-9


def test_percentile_interpolates_between_samples():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.95) == 5.0


def _auto_rows(rtt: float, walls: list[float], chosen: str) -> list[dict]:
    return [dict(_row(ladder.AUTO.key, w, rtt=rtt, prompt=i), chosen=chosen, first_block=6 if chosen == "speculative"
                 else 0) for i, w in enumerate(walls)]


def test_auto_target_is_met_when_never_slower_than_cloud_ar_at_any_rtt():
    rows = (_auto_rows(20, [0.8, 0.8], "speculative") + _auto_rows(60, [2.02, 2.0], "cloud_ar")
            + [_row(ladder.CLOUD_AR.key, 2.0, rtt=20), _row(ladder.CLOUD_AR.key, 2.0, rtt=60)])
    check = _check(_results(rows), "chosen method (auto")
    assert check.met is True
    assert "0.40x @ 20 ms (speculative 2/2, first block 6.0)" in check.measured
    assert "1.00x @ 60 ms (cloud AR 2/2)" in check.measured


def test_auto_target_is_missed_when_slower_than_cloud_ar_beyond_the_noise_at_one_rtt():
    rows = (_auto_rows(20, [0.8], "speculative") + _auto_rows(60, [2.2], "speculative")
            + [_row(ladder.CLOUD_AR.key, 2.0, rtt=20), _row(ladder.CLOUD_AR.key, 2.0, rtt=60)])
    check = _check(_results(rows), "chosen method (auto")
    assert check.met is False and "1.10x @ 60 ms" in check.measured
    assert "## Auto: speculation or streaming" in report.markdown(_results(rows))


def _replica_point(replicas: int, tokens_per_s: float, exact: bool = True) -> dict:
    return {"replicas": replicas, "robots": 8, "tokens": 400, "tokens_per_s": tokens_per_s, "p50_s": 1.0,
            "p95_s": 2.0, "open_s": 0.1, "exact": exact}


def test_a_replica_fleet_point_that_loses_exactness_is_a_failure():
    results = _results([])
    results["fleet_replicas"] = [_replica_point(1, 50.0), _replica_point(2, 40.0, exact=False)]
    assert report.exactness_failures(results) == ["fleet on 2 Ray Serve replica(s) x8: an output differs"]


def test_the_replica_rows_give_the_ratio_of_two_replicas_to_one():
    results = _results([])
    results["meta"].update(cloud_cores=[1])
    results["fleet_replicas"] = [_replica_point(2, 30.0), _replica_point(1, 60.0)]
    text = report._replicas_text(results)
    assert "2 replicas against 1: 0.50x" in text
    assert text.index("| 1 | 8 |") < text.index("| 2 | 8 |")
