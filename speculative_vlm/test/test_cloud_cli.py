"""The server's command line and configuration: flags, YAML, refusals of bad settings, JSON logs."""

import json
import logging
import subprocess
import sys

import pytest
from speculative_vlm.cloud import logs
from speculative_vlm.cloud.config import ConfigError, ServerConfig, from_mapping, from_yaml
from speculative_vlm.cloud.server import _parser, config_from_args, main


def test_console_script_help_lists_the_security_and_batching_flags():
    out = subprocess.run([sys.executable, "-m", "speculative_vlm.cloud.server", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--exit-layers", "--max-batch", "--max-wait-ms", "--tls-cert", "--tls-key",
                 "--tokens-file", "--bind", "--metrics-port", "--allow-insecure"):
        assert flag in out.stdout, flag


def test_yaml_in_ros_parameters_form_is_read_with_nested_limits(tmp_path):
    path = tmp_path / "cloud.yaml"
    path.write_text("cloud_server:\n  ros__parameters:\n    model: tiny\n    exit_layers: [2, 3]\n"
                    "    max_batch: 4\n    limits:\n      max_image_bytes: 1000\n")
    config = from_yaml(path)
    assert config.model == "tiny" and config.exit_layers == (2, 3) and config.max_batch == 4
    assert config.limits.max_image_bytes == 1000


def test_unknown_settings_are_an_error_not_ignored():
    with pytest.raises(ConfigError, match="max_bach"):
        from_mapping({"max_bach": 4})
    with pytest.raises(ConfigError, match="max_image_byte"):
        from_mapping({"limits": {"max_image_byte": 4}})


def test_flags_override_the_yaml(tmp_path):
    path = tmp_path / "cloud.yaml"
    path.write_text("model: from-yaml\nmax_batch: 8\n")
    args = _parser().parse_args(["--config", str(path), "--max-batch", "1", "--exit-layers", "5,7",
                                 "--max-image-bytes", "99"])
    config = config_from_args(args)
    assert (config.model, config.max_batch, config.exit_layers, config.limits.max_image_bytes) == \
        ("from-yaml", 1, (5, 7), 99)


def test_half_a_tls_pair_is_refused():
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        ServerConfig(tls_cert="server.crt").validate()


def test_the_server_refuses_to_start_insecurely_and_says_why(monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("SPECULATIVE_VLM_TOKENS", "robot:0123456789abcdef0123")
    assert main(["--bind", "0.0.0.0:0", "--model", "never-loaded"]) == 2
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["event"] == "refused_to_start" and "plaintext" in record["msg"]


def test_logs_are_one_json_object_per_line_with_the_event_fields():
    record = logging.LogRecord("speculative_vlm.cloud.service", logging.WARNING, __file__, 1, "refused", (), None)
    record.event, record.code, record.session = "refused", "image_too_large", "s7"
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["msg"] == "refused" and entry["level"] == "warning"
    assert (entry["event"], entry["code"], entry["session"]) == ("refused", "image_too_large", "s7")
