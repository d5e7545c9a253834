"""Who may talk to the verifier, and how: bearer tokens, TLS, and no plaintext off loopback."""

import pytest
from speculative_vlm.cloud.auth import AuthConfigError, load_tokens
from speculative_vlm.cloud.certs import make_self_signed
from speculative_vlm.cloud.config import ConfigError, ServerConfig
from speculative_vlm.cloud.server import InsecureBind, check_security, serve
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, LinkLost, Refused, SessionRequest
from speculative_vlm.protocol.client import GrpcVerifier
from tiny_models import target_alone

TOKEN = "security-test-token-abcdef0123456789"
REQUEST = SessionRequest(prompt="walk to the red ball", settings=GenerationSettings(max_new_tokens=8))


@pytest.fixture(scope="module")
def expected(models):
    return target_alone(TargetEngine(models[0]), REQUEST)


@pytest.fixture
def tokens_env(monkeypatch):
    monkeypatch.setenv("SPECULATIVE_VLM_TOKENS", f"robot-1:{TOKEN}")


@pytest.fixture
def server(models, tokens_env, cloud_server):
    return cloud_server(ServerConfig(bind="127.0.0.1:0"), TargetEngine(models[0]))


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory):
    return make_self_signed(tmp_path_factory.mktemp("tls"), hosts=("localhost", "127.0.0.1"))


@pytest.fixture
def tls_server(models, tokens_env, cert_pair, cloud_server):
    return cloud_server(ServerConfig(bind="127.0.0.1:0", tls_cert=str(cert_pair.cert), tls_key=str(cert_pair.key)),
                        TargetEngine(models[0]))


def test_plaintext_on_a_non_loopback_address_is_refused_at_start(tokens_env):
    with pytest.raises(InsecureBind, match="tls_cert"):
        serve(ServerConfig(bind="0.0.0.0:0"), engine=object())


def test_plaintext_off_loopback_is_accepted_only_when_explicitly_allowed(tokens_env):
    assert check_security(ServerConfig(bind="0.0.0.0:0", allow_insecure=True)) == {TOKEN: "robot-1"}


def test_a_server_without_tokens_refuses_to_start(monkeypatch):
    monkeypatch.delenv("SPECULATIVE_VLM_TOKENS", raising=False)
    with pytest.raises(AuthConfigError, match="no tokens configured"):
        serve(ServerConfig(bind="127.0.0.1:0"), engine=object())


def test_authentication_can_be_turned_off_on_loopback_only():
    assert check_security(ServerConfig(bind="127.0.0.1:0", require_auth=False)) == {}
    with pytest.raises(ConfigError, match="loopback"):
        check_security(ServerConfig(bind="10.1.2.3:0", require_auth=False, allow_insecure=True))


def test_tokens_load_from_a_file_and_from_the_environment(tmp_path, monkeypatch):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# robots\ngo2-alpha aaaaaaaaaaaaaaaaaaaaaaaa\n\n")
    monkeypatch.setenv("MY_TOKENS", "go2-beta:bbbbbbbbbbbbbbbbbbbbbbbb")
    assert load_tokens(str(tokens_file), "MY_TOKENS") == {
        "aaaaaaaaaaaaaaaaaaaaaaaa": "go2-alpha", "bbbbbbbbbbbbbbbbbbbbbbbb": "go2-beta"}


def test_short_tokens_are_refused_as_configuration(monkeypatch):
    monkeypatch.setenv("MY_TOKENS", "robot:short")
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        load_tokens(None, "MY_TOKENS")


def test_a_stream_without_a_token_is_refused_with_a_reason(server, monkeypatch):
    monkeypatch.delenv("SPECULATIVE_VLM_TOKEN", raising=False)
    verifier = GrpcVerifier(f"127.0.0.1:{server.port}")
    with pytest.raises(Refused) as refused:
        verifier.open(REQUEST)
    verifier.close()
    assert refused.value.code == "unauthenticated" and "Bearer" in refused.value.reason


def test_a_wrong_token_is_refused_with_a_reason(server):
    verifier = GrpcVerifier(f"127.0.0.1:{server.port}", token="not-the-right-token-at-all")
    with pytest.raises(Refused) as refused:
        verifier.open(REQUEST)
    verifier.close()
    assert refused.value.code == "unauthenticated" and "unknown token" in refused.value.reason


def test_the_token_can_come_from_the_client_environment(server, models, expected, monkeypatch):
    monkeypatch.setenv("SPECULATIVE_VLM_TOKEN", TOKEN)
    verifier = GrpcVerifier(f"127.0.0.1:{server.port}")
    assert SpeculativeDecoder(models[1], verifier, verdict_timeout_s=30).generate(REQUEST).token_ids == expected
    verifier.close()


def test_a_tls_client_without_the_certificate_cannot_connect(tls_server):
    verifier = GrpcVerifier(f"localhost:{tls_server.port}", token=TOKEN, tls=True, open_timeout_s=1.5)
    with pytest.raises(LinkLost):
        verifier.open(REQUEST)
    verifier.close()


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server):
    verifier = GrpcVerifier(f"127.0.0.1:{tls_server.port}", token=TOKEN, open_timeout_s=1.5)
    with pytest.raises(LinkLost):
        verifier.open(REQUEST)
    verifier.close()


def test_a_tls_client_with_the_certificate_decodes_through_it(tls_server, cert_pair, models, expected):
    verifier = GrpcVerifier(f"localhost:{tls_server.port}", token=TOKEN, root_cert=cert_pair.cert.read_bytes())
    assert SpeculativeDecoder(models[1], verifier, verdict_timeout_s=30).generate(REQUEST).token_ids == expected
    verifier.close()
