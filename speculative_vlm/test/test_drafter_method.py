"""The drafter's ``method`` parameter over real nodes and DDS: what ``ros2 param set`` accepts, and the
auto method choosing each step's draft length through the bridge, reported in the diagnostics.

The bridge verifies with an in-process target (tiny random models); see test_drafter_exchange.
"""

from __future__ import annotations

import uuid

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from go2_harness import wait_for
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from test_drafter_exchange import Exchange

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    e = Exchange(tmp_path_factory.mktemp("method"))
    yield e
    e.close()


def set_method(exchange: Exchange, value: str):
    """What ``ros2 param set drafter method VALUE`` does: the drafter's set_parameters service."""
    client = exchange.probe.create_client(SetParameters, "drafter/set_parameters")
    try:
        assert client.wait_for_service(timeout_sec=10.0)
        future = client.call_async(SetParameters.Request(
            parameters=[Parameter("method", value=value).to_parameter_msg()]))
        assert wait_for(future.done, 10.0)
        [result] = future.result().results
        return result
    finally:
        exchange.probe.destroy_client(client)


def test_method_is_a_run_time_parameter_whose_description_names_every_value(exchange):
    descriptor = exchange.drafter.describe_parameter("method")
    assert not descriptor.read_only
    for value in ("auto", "speculative", "cloud_ar"):
        assert value in descriptor.description and value in descriptor.additional_constraints


def test_an_unknown_method_is_refused_and_changes_nothing(exchange):
    result = set_method(exchange, "fastest")
    assert not result.successful and "not one of" in result.reason
    assert exchange.drafter.get_parameter("method").value == "speculative"


def test_cloud_ar_through_the_bridge_is_refused_because_it_cannot_stream(exchange):
    result = set_method(exchange, "cloud_ar")
    assert not result.successful and "cannot" in result.reason and "spec/open" in result.reason
    assert exchange.drafter.get_parameter("method").value == "speculative"


def test_starting_with_cloud_ar_through_the_bridge_fails_with_the_reason(exchange):
    from speculative_vlm.nodes.drafter import DrafterNode

    with pytest.raises(ValueError, match="method=cloud_ar needs a verifier that streams"):
        DrafterNode(namespace="/t" + uuid.uuid4().hex[:8], parameter_overrides=[
            Parameter("draft_model", value="/nonexistent/draft"), Parameter("method", value="cloud_ar")])


def test_auto_set_at_run_time_chooses_each_step_s_draft_length_and_the_diagnostics_say_why(exchange):
    seen: list[str] = []

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.endswith(": drafting"):
                seen.extend(kv.value for kv in status.values if kv.key == "method")

    sub = exchange.probe.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    try:
        assert set_method(exchange, "auto").successful
        assert exchange.drafter._decoder.method == "auto"
        exchange.one_step()  # nothing measured yet: speculates to measure
        assert wait_for(lambda: any("no speculative session measured yet" in v for v in seen), 10.0), seen
        drafts, _, _ = exchange.one_step()  # decided from the first step's round trip, acceptance and timings
        assert wait_for(lambda: any("predicted" in v for v in seen), 10.0), seen
        last = [v for v in seen if "predicted" in v][-1]
        # Through the bridge cloud AR is never chosen: it cannot stream.
        assert last.startswith("speculative: speculative, ") and "RTT" in last, last
        gamma = int(last.split("speculative, ")[1].split(" per block")[0])
        assert drafts and 1 <= len(drafts[0].tokens) <= gamma
    finally:
        exchange.probe.destroy_subscription(sub)
        assert set_method(exchange, "speculative").successful
