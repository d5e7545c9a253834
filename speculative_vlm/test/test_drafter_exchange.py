"""The drafter <-> bridge exchange as a bag would record it, with real nodes over DDS.

The drafter and bridge nodes run in this process on one executor; the bridge verifies with an
in-process target (tiny random models), the drafter gets a rendered camera frame, and a probe
records spec/draft, spec/verdict and drafter/stats. No motion node runs: each goal is
cancelled once its step's statistics are out.
"""

from __future__ import annotations

import pytest
from drafter_harness import Exchange, nanoseconds
from rclpy.parameter import Parameter

from speculative_vlm_msgs.msg import Verdict

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def exchange(rclpy_context, tmp_path_factory):
    e = Exchange(tmp_path_factory.mktemp("exchange"))
    yield e
    e.close()


def test_blocks_verdicts_and_stats_are_stamped_and_each_verdict_follows_its_block(exchange):
    drafts, verdicts, stats = exchange.one_step()
    assert drafts and verdicts
    assert all(nanoseconds(m.header.stamp) > 0 for m in [*drafts, *verdicts, stats])
    sent = {(d.session_id, d.round): nanoseconds(d.header.stamp) for d in drafts}
    for v in verdicts:
        if (v.session_id, v.round) in sent:
            assert nanoseconds(v.header.stamp) >= sent[(v.session_id, v.round)], f"verdict before block {v.round}"
    # The step's statistics come after the verdicts that decided it.
    last_final = max(nanoseconds(v.header.stamp) for v in verdicts if v.kind == Verdict.FINAL)
    assert nanoseconds(stats.header.stamp) >= last_final


def test_early_confidence_set_at_run_time_decides_which_early_verdicts_start_a_preemptive_block(exchange):
    exchange.set_parameter(Parameter("early_confidence", value=0.0))
    drafts, verdicts, _ = exchange.one_step()
    confidences = [v.confidence for v in verdicts if v.kind == Verdict.EARLY]
    assert any(d.preemptive for d in drafts), "no preemptive block at threshold 0"
    assert confidences and max(confidences) < 1.0
    exchange.set_parameter(Parameter("early_confidence", value=1.0))
    drafts, verdicts, _ = exchange.one_step()
    assert [v.kind for v in verdicts if v.kind == Verdict.EARLY], "the early exit still answers"
    assert drafts, "no block drafted at threshold 1"
    assert not any(d.preemptive for d in drafts), "a preemptive block above the threshold set at run time"
