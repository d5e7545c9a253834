"""Token rotation without a restart: the verifier reads its tokens file again when the file
changes and on SIGHUP, so a new token works and a removed one is refused from the next stream
on, while the server keeps running (real gRPC, a real server process for the signal)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from polling import wait_for
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    GenerationSettings,
    Refused,
    SessionRequest,
    VerdictKind,
)
from speculative_vlm.protocol.client import GrpcVerifier

OLD = "old-robot-token-00000000000000"
NEW = "new-robot-token-11111111111111"
REQUEST = SessionRequest(prompt="walk to the red ball", settings=GenerationSettings(max_new_tokens=8))
NO_ENV = "SPECULATIVE_VLM_TEST_NO_TOKENS"  # the file is the only source of tokens here


def write_tokens(path: Path, lines: list[str]) -> None:
    """As an operator rotates: write a new file beside the old one and rename it over."""
    staged = path.with_suffix(".new")
    staged.write_text("\n".join(lines) + "\n")
    staged.replace(path)


@pytest.fixture
def server(models, tmp_path, monkeypatch, cloud_server):
    monkeypatch.delenv(NO_ENV, raising=False)
    tokens = tmp_path / "tokens.txt"
    write_tokens(tokens, [f"robot-a {OLD}"])
    config = ServerConfig(bind="127.0.0.1:0", tokens_file=str(tokens), tokens_env=NO_ENV, exit_layers=(2,))
    return cloud_server(config, TargetEngine(models[0], exit_layers=[2])), tokens


def opens(port: int, token: str) -> str:
    """'opened', or the code the server refused the session with."""
    verifier = GrpcVerifier(f"127.0.0.1:{port}", token=token, open_timeout_s=10)
    try:
        verifier.open(REQUEST).close()
        return "opened"
    except Refused as exc:
        return exc.code
    finally:
        verifier.close()


def test_a_token_added_to_the_file_works_without_a_restart(server):
    handle, tokens = server
    assert opens(handle.port, NEW) == "unauthenticated"
    write_tokens(tokens, [f"robot-a {OLD}", f"robot-b {NEW}"])
    assert opens(handle.port, NEW) == "opened"
    assert opens(handle.port, OLD) == "opened"
    assert handle.authenticator.clients == ["robot-a", "robot-b"]


def test_a_token_removed_from_the_file_is_refused_after_rotation(server):
    handle, tokens = server
    assert opens(handle.port, OLD) == "opened"
    write_tokens(tokens, [f"robot-b {NEW}"])
    assert opens(handle.port, OLD) == "unauthenticated"
    assert opens(handle.port, NEW) == "opened"


def test_a_session_opened_before_its_token_was_removed_keeps_being_verified(server):
    handle, tokens = server
    verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=OLD)
    try:
        session = verifier.open(REQUEST)
        write_tokens(tokens, [f"robot-b {NEW}"])
        assert opens(handle.port, OLD) == "unauthenticated"  # the rotation is in force for new streams
        session.submit(DraftBlock(round=0, base_length=0, base_tail=(), tokens=(1, 2, 3)))
        while (verdict := session.next_verdict(timeout=10)).kind is VerdictKind.EARLY:
            pass
        assert verdict.kind is VerdictKind.FINAL
        session.close()
    finally:
        verifier.close()


def test_an_unusable_tokens_file_leaves_the_tokens_in_force(server):
    handle, tokens = server
    write_tokens(tokens, ["robot-b short"])  # a token under 16 characters is refused as a setting
    assert opens(handle.port, OLD) == "opened"
    write_tokens(tokens, ["# every token removed by mistake"])
    assert opens(handle.port, OLD) == "opened"
    write_tokens(tokens, [f"robot-b {NEW}"])  # fixed: taken at once
    assert opens(handle.port, NEW) == "opened"
    assert opens(handle.port, OLD) == "unauthenticated"


def test_sighup_makes_a_running_server_process_read_its_tokens_file_again(models, tmp_path):
    from cloud_harness import start_server

    models[0].model.save_pretrained(tmp_path / "target")
    models[0].tokenizer.save_pretrained(tmp_path / "target")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"robot-a {OLD}\n")
    config = tmp_path / "cloud.yaml"
    config.write_text(yaml.safe_dump({"bind": "127.0.0.1:0", "tokens_file": str(tokens), "tokens_env": NO_ENV,
                                      "torch_threads": 1}))
    server = start_server(tmp_path / "target", config, tokens="", seconds_per_token=0.0)
    try:
        assert opens(server.port, OLD) == "opened"
        # Rewritten in place to the same size, and its modification time put back: a change the
        # server cannot see by itself. Only the signal makes it read the file again.
        state = os.stat(tokens)
        tokens.write_text(f"robot-b {NEW}\n")
        os.utime(tokens, ns=(state.st_atime_ns, state.st_mtime_ns))
        assert opens(server.port, NEW) == "unauthenticated"
        os.kill(server.pid, signal.SIGHUP)
        wait_for(lambda: server.event("tokens_reloaded") is not None, 10, step=0.05)
        assert server.event("tokens_reloaded") is not None, json.dumps(server.log[-5:])
        assert opens(server.port, NEW) == "opened"
        assert opens(server.port, OLD) == "unauthenticated"
        assert server.proc.poll() is None  # the same process throughout
    finally:
        server.stop()
