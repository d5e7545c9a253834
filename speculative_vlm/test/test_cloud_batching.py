"""Many robots, one target: the server batches verification across sessions, and each robot
still gets exactly its own target-greedy output."""

import json
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.protocol.client import GrpcVerifier
from tiny_models import target_alone

TOKEN = "batching-test-token-0123456789"
PROMPTS = ["walk to the red ball", "turn left slowly", "sit down now", "go back two metres"]


def _request(prompt: str, max_new_tokens: int = 24) -> SessionRequest:
    return SessionRequest(prompt=prompt, settings=GenerationSettings(max_new_tokens=max_new_tokens))


@pytest.fixture(scope="module")
def expected(models):
    engine = TargetEngine(models[0], exit_layers=[2])
    return {p: target_alone(engine, _request(p)) for p in PROMPTS}


@pytest.fixture
def server(models, cloud_server):
    """Starts the verifier for a test: ``server(**config changes)``; stopped after it."""

    def start(**changes):
        config = ServerConfig(bind="127.0.0.1:0", metrics_port=0, exit_layers=(2,), **changes)
        engine = TargetEngine(models[0], exit_layers=[2], max_batch=config.max_batch)
        return cloud_server(config, engine, tokens=f"robots:{TOKEN}")

    return start


def _run_clients(models, port: int) -> dict[str, list[int]]:
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS))

    def robot(prompt: str) -> None:
        try:
            verifier = GrpcVerifier(f"127.0.0.1:{port}", token=TOKEN)
            decoder = SpeculativeDecoder(models[1], verifier, preempt=False, verdict_timeout_s=30)
            start.wait()
            results[prompt] = decoder.generate(_request(prompt)).token_ids
            verifier.close()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=robot, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_four_concurrent_robots_each_get_their_own_target_output_while_batched(models, expected, server):
    handle = server(max_batch=4, max_wait_ms=20)
    results = _run_clients(models, handle.port)
    assert results == expected
    assert handle.service.scheduler.largest_batch > 1, "no pass verified more than one session"


def test_batch_size_one_never_puts_two_sessions_in_one_pass(models, expected, server):
    handle = server(max_batch=1)
    assert _run_clients(models, handle.port) == expected
    assert handle.service.scheduler.largest_batch == 1


def test_cloud_autoregressive_streams_the_target_output(expected, server):
    handle = server()
    verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN)
    streamed: list[int] = []
    tokens = verifier.generate(_request(PROMPTS[0]), on_token=streamed.append)
    verifier.close()
    assert tokens == streamed == expected[PROMPTS[0]]


def test_health_service_and_metrics_report_the_serving_state(models, server):
    handle = server()
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "speculative_vlm.v1.Verification"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN)
    assert verifier.serving()
    SpeculativeDecoder(models[1], verifier, verdict_timeout_s=30).generate(_request(PROMPTS[1], 8))
    verifier.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=5).read().decode()
    model = 'model="smollm2-135m-instruct"'  # the served model's name labels every metric
    for name in (f"svlm_sessions_total{{{model}}} 1.0", "svlm_batch_size_count", "svlm_accepted_tokens_count",
                 "svlm_verify_latency_seconds_count", "svlm_accepted_tokens_per_pass_count",
                 f'svlm_rounds_total{{{model},outcome="verified"}}'):
        assert name in text, name


def test_the_batching_benchmark_reports_both_phases_and_checks_every_output(models, tmp_path, capsys):
    from speculative_vlm.cli import main

    model_dir = tmp_path / "tiny"
    models[0].model.save_pretrained(model_dir)
    models[0].tokenizer.save_pretrained(model_dir)
    report_path = tmp_path / "bench.json"
    assert main(["bench-cloud-batching", "--model", str(model_dir), "--clients", "3", "--max-new-tokens", "8",
                 "--draft-ms-per-token", "0", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["batched"]["exact"] and report["unbatched"]["exact"]
    assert report["unbatched"]["largest_batch"] == 1
    assert report["batched"]["tokens"] == report["unbatched"]["tokens"] == report[
        "cloud_autoregressive_sequential"]["tokens"]


def test_opened_tells_the_robot_the_target_vocabulary_and_exit_layers(models, server):
    handle = server()
    verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN)
    session = verifier.open(_request(PROMPTS[0]))
    opened = session.opened
    session.close()
    verifier.close()
    assert opened.vocab_size == models[0].vocab_size and list(opened.exit_layers) == [2]
    assert set(opened.eos_token_ids) == set(models[0].eos_token_ids)
    assert opened.target_model == models[0].name
