"""What an operator sees of a running verifier: Prometheus metrics (labelled by model) that agree
with what the robots saw, gRPC reflection, health that turns NOT_SERVING when verification
breaks, and a Grafana dashboard that plots only metrics the server has. Real gRPC on
loopback, tiny models."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from cloud_harness import metric_sum, scrape
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from polling import read_until
from prometheus_client.parser import text_string_to_metric_families
from speculative_vlm.cloud.config import ConfigError, ServerConfig
from speculative_vlm.cloud.metrics import ServerMetrics
from speculative_vlm.cloud.server import _parser, config_from_args
from speculative_vlm.cloud.service import SERVICE_NAME
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    GenerationSettings,
    Refused,
    SessionRequest,
    Verdict,
    VerdictKind,
    Verifier,
    VerifierSession,
)
from speculative_vlm.protocol.client import GrpcVerifier

TOKEN = "metrics-test-token-0123456789"
MODEL = "tiny-llama-target"
DASHBOARD = Path(__file__).resolve().parents[1] / "config" / "grafana" / "verifier-dashboard.json"
PROMPTS = ["walk to the red ball", "turn left slowly", "sit down now"]


@pytest.fixture
def server(models, cloud_server):
    """Starts the verifier, with metrics, for a test: ``server(**config changes)``; stopped after it."""

    def start(**changes):
        config = ServerConfig(model=MODEL, bind="127.0.0.1:0", metrics_bind="127.0.0.1:0", exit_layers=(2,),
                              **changes)
        engine = TargetEngine(models[0], exit_layers=[2], max_batch=config.max_batch)
        return cloud_server(config, engine, tokens=f"robots:{TOKEN}")

    return start


def _request(prompt: str, max_new_tokens: int = 24) -> SessionRequest:
    return SessionRequest(prompt=prompt, settings=GenerationSettings(max_new_tokens=max_new_tokens))


class _Recording(Verifier):
    """The robot's verifier, recording every verdict its sessions hand to the decoding loop."""

    def __init__(self, inner: GrpcVerifier):
        self.inner, self.verdicts = inner, []  # one list per session, in order

    def open(self, request: SessionRequest) -> VerifierSession:
        self.verdicts.append([])
        return _RecordingSession(self.inner.open(request), self.verdicts[-1])


class _RecordingSession(VerifierSession):
    def __init__(self, inner: VerifierSession, verdicts: list[Verdict]):
        self.inner, self.verdicts, self.session_id = inner, verdicts, inner.session_id

    def submit(self, block) -> None:
        self.inner.submit(block)

    def next_verdict(self, timeout: float | None = None) -> Verdict:
        verdict = self.inner.next_verdict(timeout)
        self.verdicts.append(verdict)
        return verdict

    def close(self) -> None:
        self.inner.close()


def _decode(models, handle, prompts=PROMPTS, preempt: bool = False):
    """Each prompt decoded by a robot through the server; the results and the verdicts of each session."""
    grpc_verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN)
    verifier = _Recording(grpc_verifier)
    try:
        decoder = SpeculativeDecoder(models[1], verifier, preempt=preempt, verdict_timeout_s=30)
        results = [decoder.generate(_request(p)) for p in prompts]
    finally:
        grpc_verifier.close()
    return results, verifier.verdicts


def _settled(handle, name: str, expected: float, timeout: float = 5.0, **labels: str) -> list:
    """Scrape until ``name`` reaches ``expected`` (the server counts a session as it closes)."""
    return read_until(lambda: scrape(handle.metrics_port),
                      lambda families: metric_sum(families, name, **labels) == expected, timeout)


def test_every_metric_sample_carries_the_served_models_name(models, server):
    handle = server()
    _decode(models, handle, PROMPTS[:1])
    samples = [s for f in scrape(handle.metrics_port) if f.name.startswith("svlm_") for s in f.samples]
    assert len(samples) > 50
    assert {s.labels.get("model") for s in samples} == {MODEL}


def test_drafted_and_accepted_tokens_are_the_robots_own_totals(models, server):
    handle = server()
    results, _ = _decode(models, handle)
    families = scrape(handle.metrics_port)
    drafted, accepted = sum(r.drafted for r in results), sum(r.accepted for r in results)
    assert 0 < accepted < drafted  # a noisy draft: some accepted, some not
    assert metric_sum(families, "svlm_spec_decode_draft_tokens_total") == drafted
    assert metric_sum(families, "svlm_spec_decode_accepted_tokens_total") == accepted
    assert metric_sum(families, "svlm_spec_decode_drafts_total") == sum(len(r.rounds) for r in results)


def test_accepted_tokens_per_position_count_each_accepted_prefix_position(models, server):
    handle = server()
    results, _ = _decode(models, handle)
    rounds = [r for result in results for r in result.rounds]
    families = scrape(handle.metrics_port)
    longest = max(r.drafted for r in rounds)
    assert longest > 0, "no block was drafted"
    for position in range(longest):
        assert metric_sum(families, "svlm_spec_decode_accepted_tokens_per_pos_total", position=str(position)) == \
            sum(r.accepted > position for r in rounds)
        assert metric_sum(families, "svlm_spec_decode_draft_tokens_per_pos_total", position=str(position)) == \
            sum(r.drafted > position for r in rounds)


def test_early_verdicts_are_judged_hit_or_miss_against_their_final_verdict_per_exit_layer(models, server):
    handle = server()
    _, sessions = _decode(models, handle)
    seen: Counter[tuple[int, str]] = Counter()
    for verdicts in sessions:
        finals = {v.round: v for v in verdicts if v.kind is VerdictKind.FINAL}
        for v in verdicts:
            if v.kind is VerdictKind.EARLY:
                same = (v.accepted, v.token) == (finals[v.round].accepted, finals[v.round].token)
                seen[v.exit_layer, "hit" if same else "miss"] += 1
    assert seen[2, "hit"] > 0 and seen[2, "miss"] > 0  # both outcomes occur with this draft
    families = scrape(handle.metrics_port)
    for (layer, outcome), count in seen.items():
        name = {"hit": "svlm_early_verdict_hits_total", "miss": "svlm_early_verdict_misses_total"}[outcome]
        assert metric_sum(families, name, exit_layer=str(layer)) == count
    assert metric_sum(families, "svlm_early_verdicts_total", exit_layer="2") == seen[2, "hit"] + seen[2, "miss"]


def test_time_to_first_token_is_observed_once_per_session_from_open_to_its_first_token(models, server):
    handle = server()
    verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN)
    try:
        started = time.monotonic()
        results, _ = _decode(models, handle, PROMPTS[:2])
        streamed = verifier.generate(_request(PROMPTS[2]))
        elapsed = time.monotonic() - started
        assert results[0].token_ids and streamed
        families = scrape(handle.metrics_port)
        name = "svlm_time_to_first_token_seconds"
        assert metric_sum(families, name + "_count", mode="speculative") == 2
        assert metric_sum(families, name + "_count", mode="autoregressive") == 1
        # From the server's side of each Open: within the wall time the robots saw for all three.
        assert 0 < metric_sum(families, name + "_sum", mode="speculative") < elapsed
        assert 0 < metric_sum(families, name + "_sum", mode="autoregressive") < elapsed
    finally:
        verifier.close()


def test_refusals_are_counted_by_their_error_code(server):
    handle = server()
    intruder = GrpcVerifier(f"127.0.0.1:{handle.port}", token="not-the-token-at-all-000", open_timeout_s=5)
    with pytest.raises(Refused) as refused:
        intruder.open(_request(PROMPTS[0]))
    intruder.close()
    assert refused.value.code == "unauthenticated"
    families = scrape(handle.metrics_port)
    assert metric_sum(families, "svlm_refusals_total", code="unauthenticated") == 1
    assert metric_sum(families, "svlm_refusals_total") == 1


def test_sessions_gauge_counts_open_sessions_while_they_are_open(server):
    handle = server()
    verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN)
    try:
        sessions = [verifier.open(_request(p)) for p in PROMPTS[:2]]
        assert metric_sum(scrape(handle.metrics_port), "svlm_sessions_open") == 2
        for session in sessions:
            session.close()
        assert metric_sum(_settled(handle, "svlm_sessions_open", 0), "svlm_sessions_open") == 0
        assert metric_sum(scrape(handle.metrics_port), "svlm_sessions_total") == 2
    finally:
        verifier.close()


def test_batch_size_queue_time_and_pass_time_are_observed_for_every_pass(models, server):
    handle = server()
    results, _ = _decode(models, handle, PROMPTS[:2])
    families = scrape(handle.metrics_port)
    passes = sum(len(r.rounds) for r in results)  # one robot at a time: one block per pass
    assert metric_sum(families, "svlm_batch_size_count") == passes
    assert metric_sum(families, "svlm_batch_size_sum") == passes
    assert metric_sum(families, "svlm_verify_latency_seconds_count") == passes
    assert metric_sum(families, "svlm_queue_wait_seconds_count") == passes
    assert 0 < metric_sum(families, "svlm_verify_latency_seconds_sum") < sum(r.wall_s for r in results)


def test_a_merged_registrys_samples_are_served_in_the_same_families_with_its_labels():
    # What the Ray Serve front does with each replica's metrics (test_cloud_ray scrapes a real fleet).
    front, replica = ServerMetrics(MODEL), ServerMetrics(MODEL)
    replica.observe_verified(drafted=4, accepted=3)
    front.refusals.labels("draining").inc()
    front.merge(lambda: [({"replica": "r1"}, replica.registry.collect())])
    port = front.serve(0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        front.stop()
    assert text.count("# TYPE svlm_spec_decode_draft_tokens_total counter") == 1  # one family, both servers' samples
    families = list(text_string_to_metric_families(text))
    assert metric_sum(families, "svlm_spec_decode_draft_tokens_total", model=MODEL, replica="r1") == 4
    assert metric_sum(families, "svlm_spec_decode_accepted_tokens_total", model=MODEL, replica="r1") == 3
    assert metric_sum(families, "svlm_spec_decode_accepted_tokens_total") == 3  # the front's own sample is 0
    assert metric_sum(families, "svlm_refusals_total", code="draining") == 1
    assert not [s for f in families for s in f.samples if s.name == "svlm_refusals_total" and "replica" in s.labels]


def test_metrics_bind_takes_a_host_and_port_from_the_flag(server):
    config = config_from_args(_parser().parse_args(["--metrics-bind", "0.0.0.0:9464", "--no-auth"]))
    assert config.metrics_address == ("0.0.0.0", 9464)
    assert config_from_args(_parser().parse_args(["--metrics-port", "9100"])).metrics_address == ("127.0.0.1", 9100)
    assert ServerConfig().metrics_address is None  # off unless asked for
    with pytest.raises(ConfigError, match="host:port"):
        ServerConfig(metrics_bind="9464").validate()
    with pytest.raises(ConfigError, match="not both"):
        ServerConfig(metrics_bind="127.0.0.1:1", metrics_port=2).validate()
    handle = server()
    assert handle.metrics_port > 0 and scrape(handle.metrics_port)


def test_reflection_describes_the_verifier_and_health_services(server):
    handle = server()
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(database.get_services())
        service = DescriptorPool(database).FindServiceByName(SERVICE_NAME)
        session = service.methods_by_name["Session"]
        assert session.client_streaming and session.server_streaming
        assert session.input_type.full_name == "speculative_vlm.v1.ClientMessage"


def test_reflection_can_be_turned_off(server):
    handle = server(reflection=False)
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        with pytest.raises(grpc.RpcError) as failed:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert failed.value.code() is grpc.StatusCode.UNIMPLEMENTED


def _health(handle) -> dict[str, int]:
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                for name in ("", SERVICE_NAME)}


def _wait_health(handle, status: int, timeout: float = 5.0) -> dict[str, int]:
    return read_until(lambda: _health(handle), lambda seen: seen == {"": status, SERVICE_NAME: status},
                      timeout)


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_health_goes_not_serving_when_the_verification_thread_dies(models, server):
    handle = server()
    _decode(models, handle, PROMPTS[:1])  # refused and failed blocks before: still serving
    assert _health(handle) == {"": SERVING, SERVICE_NAME: SERVING}

    def broken() -> list:
        raise RuntimeError("scheduler bug")

    handle.service.scheduler._ready = broken  # the thread's next wake-up raises out of its loop
    verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN)
    first = threading.Thread(target=lambda: _try_decode(models, verifier), daemon=True)
    first.start()  # its block wakes the thread, which dies: that robot's verdict never comes
    assert _wait_health(handle, NOT_SERVING) == {"": NOT_SERVING, SERVICE_NAME: NOT_SERVING}
    assert not handle.service.scheduler._thread.is_alive()
    assert metric_sum(scrape(handle.metrics_port), "svlm_scheduler_up") == 0
    # A robot arriving now is told at its first block, instead of waiting for a verdict that never comes.
    assert _try_decode(models, verifier) == "verify_failed"
    verifier.close()


def test_health_goes_not_serving_when_a_verification_pass_raises_as_a_whole(models, server, monkeypatch):
    handle = server()
    assert metric_sum(scrape(handle.metrics_port), "svlm_scheduler_up") == 1

    def device_lost(items, on_early=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(handle.service.engine, "verify", device_lost)
    verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN)
    assert _try_decode(models, verifier) == "verify_failed"  # the robot is told, not left waiting
    assert _wait_health(handle, NOT_SERVING) == {"": NOT_SERVING, SERVICE_NAME: NOT_SERVING}
    assert handle.service.scheduler.broken and "illegal memory access" in handle.service.scheduler.broken
    verifier.close()


def _try_decode(models, verifier: GrpcVerifier) -> str:
    try:
        SpeculativeDecoder(models[1], verifier, preempt=False, verdict_timeout_s=10).generate(_request(PROMPTS[0]))
    except Exception as exc:  # the test asserts what it was
        return getattr(exc, "code", repr(exc))
    return "decoded"


# ---- the Grafana dashboard ------------------------------------------------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def dashboard_metrics(dashboard: dict) -> dict[str, set[str]]:
    """{metric name: titles of the panels whose PromQL names it}, over every panel (rows included)."""
    names: dict[str, set[str]] = {}

    def panels(items: list) -> list:
        out = []
        for panel in items:
            out.append(panel)
            out.extend(panels(panel.get("panels", [])))
        return out

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = re.sub(r'"[^"]*"', "", target["expr"])  # label values and strings
            expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
            expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
            for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
                word = match.group(0)
                if word.lower() in PROMQL_WORDS or expr[match.end():].lstrip().startswith("("):
                    continue  # a keyword or a function
                names.setdefault(word, set()).add(panel.get("title", "?"))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query", "")
        query = query.get("query", "") if isinstance(query, dict) else query
        for name in re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", query):
            names.setdefault(name, set()).add(f"variable {variable.get('name')}")
    return names


def exposed_names(families) -> set[str]:
    """Every series name the server's registry can expose (whether or not it has samples yet)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
    return {f.name + suffix for f in families for suffix in suffixes.get(f.type, ("",))}


def missing_from(dashboard: dict, families) -> dict[str, set[str]]:
    exposed = exposed_names(families)
    return {name: panels for name, panels in dashboard_metrics(dashboard).items() if name not in exposed}


def test_every_metric_the_dashboard_plots_exists_after_a_real_decode(models, server):
    dashboard = json.loads(DASHBOARD.read_text())
    handle = server()
    _decode(models, handle, PROMPTS[:2], preempt=True)
    GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN).generate(_request(PROMPTS[2]))
    families = scrape(handle.metrics_port)
    plotted = dashboard_metrics(dashboard)
    assert len(plotted) >= 15, sorted(plotted)  # the list: acceptance, positions, exits, TTFT, ...
    assert missing_from(dashboard, families) == {}
    # And each plotted series has data after a decode (refusals aside: none happened here).
    with_samples = {s.name for f in families for s in f.samples}
    assert {n for n in plotted if n not in with_samples and not n.startswith("svlm_refusals")} == set()


def test_the_dashboard_check_names_a_panel_that_plots_a_metric_the_server_lacks(server):
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"].append({"title": "typo", "targets": [
        {"expr": 'sum by (model) (rate(svlm_spec_decode_acepted_tokens_total{model=~"$model"}[5m]))'}]})
    handle = server()
    families = scrape(handle.metrics_port)
    assert missing_from(dashboard, families) == {"svlm_spec_decode_acepted_tokens_total": {"typo"}}
