"""Configuration of the verifier server: one dataclass, read from YAML and command-line flags.

The YAML is a plain mapping with the field names below (``limits:`` nested); a
``ros__parameters`` wrapper, as the robot-side configs use, is accepted and unwrapped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from speculative_vlm.decoding import placement


class ConfigError(ValueError):
    """The server configuration is unusable; the message names the field and the fix."""


# RPC slots kept free of sessions, so a refusal (and a health check) can still be answered.
RESERVED_RPC_SLOTS = 4


@dataclass(frozen=True)
class ServerLimits:
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC receive limit; larger messages are refused
    max_image_bytes: int = 2 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    # The prompt's length in tokens after the chat template (system + user message) and the
    # image: what the prefill costs. The character limits only bound the tokenizer's work.
    max_prompt_tokens: int = 2048
    max_prompt_chars: int = 32000
    max_system_chars: int = 32000
    max_draft_tokens: int = 32
    max_new_tokens: int = 1024
    # Streams, whether or not they have opened a session yet: each holds one of the gRPC
    # server's RPC slots, so the total stays below them (refusals and health checks need some).
    max_sessions: int = 48
    max_sessions_per_client: int = 8
    # Keys/values of every session's prompt + max_new_tokens + a block, reserved at Open; a
    # client may hold its share of it (max_sessions_per_client / max_sessions).
    kv_budget_mb: float = 4096.0
    requests_per_second: float = 500.0  # per client; Open and Draft both count
    burst: int = 100
    # Failed authentications per peer address: after auth_max_failures within auth_window_s the
    # address is locked out for auth_lockout_s, doubling with each further lockout up to the max.
    auth_max_failures: int = 5
    auth_window_s: float = 60.0
    auth_lockout_s: float = 10.0
    auth_max_lockout_s: float = 600.0


@dataclass(frozen=True)
class ServerConfig:
    model: str = "smollm2-135m-instruct"  # a folder or a model-store name
    exit_layers: tuple[int, ...] = ()
    exit_heads: str | None = None  # trained exit adapters; None = shared norm + LM head
    # Where the target (and its exit heads) runs: cpu, cuda or cuda:N; float32, bfloat16 or float16.
    # Checked here for spelling only; the machine is checked when the model loads.
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8  # 1 = unbatched
    max_wait_ms: float = 5.0  # longest a block waits for others to join its batch
    bind: str = "127.0.0.1:50051"  # port 0 picks a free one
    tls_cert: str | None = None
    tls_key: str | None = None
    # Mutual TLS: clients must present a certificate signed by this CA (PEM); None = server TLS only.
    tls_client_ca: str | None = None
    allow_insecure: bool = False  # plaintext on a non-loopback address
    require_auth: bool = True
    tokens_file: str | None = None  # lines "client-name token" (or just "token")
    tokens_env: str = "SPECULATIVE_VLM_TOKENS"  # "name:token,name:token" (or just tokens)
    # Prometheus /metrics: metrics_bind is host:port (port 0 picks one); metrics_port N is short for
    # metrics_bind "127.0.0.1:N". Neither = off.
    metrics_bind: str | None = None
    metrics_port: int | None = None
    reflection: bool = True  # gRPC server reflection (grpcurl, grpcui list and call the services)
    session_idle_s: float = 60.0
    open_timeout_s: float = 5.0  # a stream must send Open within this (or session_idle_s, if shorter)
    # On SIGTERM the server drains: blocks already in flight get their verdicts within this, then
    # every session left is ended with the retryable code ``draining`` and the process exits.
    drain_timeout_s: float = 10.0
    # Prompts are prefilled this many tokens at a time, and other sessions' verification passes
    # run between chunks: a long prompt delays them by one chunk at most.
    prefill_chunk_tokens: int = 256
    workers: int = 64  # gRPC handler threads; each open stream holds one
    torch_threads: int | None = None
    log_level: str = "INFO"
    limits: ServerLimits = field(default_factory=ServerLimits)

    @property
    def host(self) -> str:
        return self.bind.rsplit(":", 1)[0].strip("[]")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the Prometheus endpoint, or None when metrics are off."""
        if self.metrics_bind is not None:
            host, _, port = self.metrics_bind.rpartition(":")
            return host.strip("[]"), int(port)
        return None if self.metrics_port is None else ("127.0.0.1", self.metrics_port)

    def validate(self) -> ServerConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both, or neither for plaintext")
        if self.tls_client_ca and not self.tls:
            raise ConfigError("tls_client_ca (mutual TLS) needs the server's own tls_cert and tls_key")
        if self.metrics_bind is not None:
            if self.metrics_port is not None:
                raise ConfigError("give metrics_bind (host:port) or metrics_port, not both")
            host, _, port = self.metrics_bind.rpartition(":")
            if not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"metrics_bind must be host:port (port 0 picks one), got {self.metrics_bind!r}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1 (1 = unbatched), got {self.max_batch}")
        try:
            placement.parse(self.device, self.dtype)
        except placement.PlacementError as exc:
            raise ConfigError(str(exc)) from None
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if ":" not in self.bind:
            raise ConfigError(f"bind must be host:port, got {self.bind!r}")
        if self.open_timeout_s <= 0 or self.session_idle_s <= 0:
            raise ConfigError("open_timeout_s and session_idle_s must be > 0 s")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"drain_timeout_s must be >= 0 s (0 ends sessions at once), got {self.drain_timeout_s}")
        if self.prefill_chunk_tokens < 1:
            raise ConfigError(f"prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens}")
        limits = self.limits
        if limits.max_prompt_tokens < 1 or limits.kv_budget_mb <= 0:
            raise ConfigError("limits.max_prompt_tokens must be >= 1 and limits.kv_budget_mb > 0")
        if not 1 <= limits.max_sessions_per_client <= limits.max_sessions:
            raise ConfigError(f"limits.max_sessions_per_client ({limits.max_sessions_per_client}) must be "
                              f"between 1 and limits.max_sessions ({limits.max_sessions})")
        if limits.max_sessions > self.rpc_slots - RESERVED_RPC_SLOTS:
            raise ConfigError(f"limits.max_sessions ({limits.max_sessions}) must leave {RESERVED_RPC_SLOTS} "
                              f"of the {self.rpc_slots} RPC slots (workers - 2) free for refusals and health "
                              f"checks; lower it to {self.rpc_slots - RESERVED_RPC_SLOTS} or raise workers")
        if limits.auth_max_failures < 1 or min(limits.auth_window_s, limits.auth_lockout_s) <= 0 or \
                limits.auth_max_lockout_s < limits.auth_lockout_s:
            raise ConfigError("limits.auth_max_failures must be >= 1, auth_window_s and auth_lockout_s > 0, "
                              "and auth_max_lockout_s >= auth_lockout_s")
        return self

    @property
    def rpc_slots(self) -> int:
        """Streams the gRPC server runs at once; it refuses more with a bare RESOURCE_EXHAUSTED."""
        return max(1, self.workers - 2)

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)


def from_mapping(data: dict[str, Any]) -> ServerConfig:
    """A validated ServerConfig from a mapping; unknown keys are an error, not ignored."""
    if "ros__parameters" in data:
        data = data["ros__parameters"]
    elif len(data) == 1 and isinstance(next(iter(data.values())), dict) and \
            "ros__parameters" in next(iter(data.values())):
        data = next(iter(data.values()))["ros__parameters"]
    data = dict(data)
    limits_data = dict(data.pop("limits", {}) or {})
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown server settings {unknown}; known: {sorted(known)}")
    known_limits = {f.name for f in dataclasses.fields(ServerLimits)}
    unknown = sorted(set(limits_data) - known_limits)
    if unknown:
        raise ConfigError(f"unknown limits {unknown}; known: {sorted(known_limits)}")
    if "exit_layers" in data:
        data["exit_layers"] = tuple(int(x) for x in data["exit_layers"] or ())
    return ServerConfig(**data, limits=ServerLimits(**limits_data)).validate()


def from_yaml(path: str | Path, section: str | None = None) -> ServerConfig:
    """Settings from a YAML file; ``section`` picks one section of a multi-section file
    (``cloud_server`` of config/sim.yaml), so a launch file never writes a copy of it."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read server config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    if section is not None:
        if not isinstance(data.get(section), dict):
            raise ConfigError(f"{path} has no section {section!r}; sections: {sorted(data)}")
        data = data[section]
    return from_mapping(data)
