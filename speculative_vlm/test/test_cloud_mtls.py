"""Mutual TLS: a verifier started with a client CA accepts only robots holding a certificate that
CA signed. The certificates come from ``speculative-vlm cloud-certs`` (a CA, the server's pair,
client pairs from the same CA); real gRPC over TLS on loopback."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cloud_harness import serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from speculative_vlm.cli import main as cli
from speculative_vlm.cloud.config import ConfigError, ServerConfig
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, LinkLost, SessionRequest
from speculative_vlm.protocol.client import GrpcVerifier

TOKEN = "mtls-robot-token-0123456789abcdef"
REQUEST = SessionRequest(prompt="walk to the red ball", settings=GenerationSettings(max_new_tokens=8))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """Our CA with the server's pair and robot1's; another CA with a pair of its own."""
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    assert cli(["cloud-certs", str(ours)]) == 0
    assert cli(["cloud-certs", str(ours), "--client", "robot1"]) == 0
    assert cli(["cloud-certs", str(theirs)]) == 0
    assert cli(["cloud-certs", str(theirs), "--client", "intruder"]) == 0
    return {"ca": ours / "ca.crt", "cert": ours / "server.crt", "key": ours / "server.key",
            "robot_cert": ours / "robot1.crt", "robot_key": ours / "robot1.key",
            "foreign_cert": theirs / "intruder.crt", "foreign_key": theirs / "intruder.key"}


@pytest.fixture(scope="module")
def server(models, pki):
    config = ServerConfig(bind="127.0.0.1:0", tls_cert=str(pki["cert"]), tls_key=str(pki["key"]),
                          tls_client_ca=str(pki["ca"]), tokens_env="SPECULATIVE_VLM_TEST_MTLS_TOKENS")
    with serving(config, TargetEngine(models[0]), tokens=f"robot1:{TOKEN}",
                 tokens_env="SPECULATIVE_VLM_TEST_MTLS_TOKENS") as handle:
        yield handle


def robot(server, pki, cert: str | None = None, key: str | None = None) -> GrpcVerifier:
    return GrpcVerifier(f"127.0.0.1:{server.port}", token=TOKEN, root_cert=pki["ca"].read_bytes(),
                        client_cert=pki[cert].read_bytes() if cert else None,
                        client_key=pki[key].read_bytes() if key else None, open_timeout_s=2.0)


def test_a_robot_with_a_certificate_from_the_servers_ca_decodes(server, pki, models):
    verifier = robot(server, pki, "robot_cert", "robot_key")
    try:
        result = SpeculativeDecoder(models[1], verifier, verdict_timeout_s=30).generate(REQUEST)
        assert result.verified and result.token_ids
    finally:
        verifier.close()


def test_a_robot_without_a_client_certificate_is_refused_at_the_handshake(server, pki):
    opened_before = server.metrics.sessions_total._value.get()
    verifier = robot(server, pki)
    try:
        with pytest.raises(LinkLost):
            verifier.open(REQUEST)
    finally:
        verifier.close()
    assert server.metrics.sessions_total._value.get() == opened_before  # nothing reached the service


def test_a_robot_with_a_certificate_from_another_ca_is_refused_at_the_handshake(server, pki):
    opened_before = server.metrics.sessions_total._value.get()
    verifier = robot(server, pki, "foreign_cert", "foreign_key")
    try:
        with pytest.raises(LinkLost):
            verifier.open(REQUEST)
    finally:
        verifier.close()
    assert server.metrics.sessions_total._value.get() == opened_before


def test_without_a_client_certificate_not_even_health_checks_get_through(server, pki):
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_client_ca_needs_the_servers_own_tls_pair(pki):
    with pytest.raises(ConfigError, match="tls_client_ca"):
        ServerConfig(tls_client_ca=str(pki["ca"])).validate()


def test_cloud_certs_mints_a_client_pair_only_from_an_existing_ca(tmp_path, capsys):
    assert cli(["cloud-certs", str(tmp_path), "--client", "robot2"]) == 2
    assert "run `speculative-vlm cloud-certs" in capsys.readouterr().out
    assert not (tmp_path / "robot2.crt").exists()


def test_cloud_certs_keeps_an_existing_ca_so_its_client_certificates_stay_valid(tmp_path):
    assert cli(["cloud-certs", str(tmp_path)]) == 0
    ca = (tmp_path / "ca.crt").read_bytes()
    assert cli(["cloud-certs", str(tmp_path), "--host", "verifier.example.org"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca


@pytest.mark.ros
def test_the_bridge_presents_its_tls_cert_and_key_parameters_to_the_verifier(server, pki, monkeypatch,
                                                                           rclpy_context):
    from rclpy.parameter import Parameter
    from speculative_vlm.nodes.bridge import BridgeNode

    monkeypatch.setenv("SPECULATIVE_VLM_TOKEN", TOKEN)
    params = {"cloud_address": f"127.0.0.1:{server.port}", "auth_token_env": "SPECULATIVE_VLM_TOKEN",
              "tls_ca": str(pki["ca"]), "tls_cert": str(pki["robot_cert"]), "tls_key": str(pki["robot_key"])}
    node = BridgeNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    try:
        node._verifier.open(REQUEST).close()  # the handshake needed robot1's certificate
    finally:
        node._verifier.close()
        node.destroy_node()
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        BridgeNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items() if k != "tls_key"])
