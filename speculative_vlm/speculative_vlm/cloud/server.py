"""Starts the verifier server: in-process (``serve(config)``) or as ``speculative-vlm-cloud``.

Security is decided here, before a port opens: plaintext is refused on a non-loopback
address unless explicitly allowed, authentication needs configured tokens, and only a
loopback server may run without authentication.

Operations: the standard gRPC health service (NOT_SERVING once the batch scheduler breaks),
server reflection (``grpcurl -plaintext HOST:PORT list``), Prometheus metrics on
``metrics_bind`` (``cloud.metrics``), the tokens file re-read on SIGHUP or when it changes, and
optional mutual TLS (``tls_client_ca``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from speculative_vlm.cloud import logs
from speculative_vlm.cloud.auth import AuthConfigError, TokenAuthenticator, load_tokens
from speculative_vlm.cloud.config import ConfigError, ServerConfig, ServerLimits, from_yaml
from speculative_vlm.cloud.metrics import ServerMetrics
from speculative_vlm.cloud.service import SERVICE_NAME, VerificationService
from speculative_vlm.decoding.placement import PlacementError

log = logging.getLogger("speculative_vlm.cloud.server")


class InsecureBind(ConfigError):
    """Plaintext was requested on an address other machines can reach."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_security(config: ServerConfig) -> dict[str, str]:
    """The {token: client} table, after refusing insecure set-ups; raises ConfigError/AuthConfigError."""
    loopback = is_loopback(config.host)
    if not config.tls and not loopback and not config.allow_insecure:
        raise InsecureBind(f"refusing plaintext on {config.bind}: give tls_cert and tls_key, bind to 127.0.0.1, "
                           "or set allow_insecure if the network is trusted")
    if not config.require_auth:
        if not loopback:
            raise ConfigError(f"authentication can only be turned off on a loopback address, not {config.bind}")
        return {}
    tokens = load_tokens(config.tokens_file, config.tokens_env)
    if not tokens:
        raise AuthConfigError(f"no tokens configured: write 'name token' lines to a tokens_file or set "
                              f"{config.tokens_env}=name:token (or set require_auth: false on loopback)")
    return tokens


def build_engine(config: ServerConfig) -> Any:
    """The target engine for ``config.model`` (with its exit layers), loaded through the engine's loader."""
    from speculative_vlm.decoding.models import load_model
    from speculative_vlm.decoding.target_engine import TargetEngine

    return TargetEngine(load_model(config.model, dtype=config.dtype, device=config.device),
                        exit_layers=list(config.exit_layers), exit_heads=config.exit_heads,
                        max_batch=config.max_batch, prefill_chunk_tokens=config.prefill_chunk_tokens)


@dataclass
class ServerHandle:
    """A running server: ``port`` for clients, ``stop()`` to end it."""

    port: int
    metrics_port: int | None
    config: ServerConfig
    service: VerificationService
    metrics: ServerMetrics
    _server: grpc.Server
    _health: health.HealthServicer
    authenticator: TokenAuthenticator | None = None

    def reload_tokens(self) -> bool:
        """Read the tokens file again (SIGHUP); False (the old tokens stay) if it is unusable or auth is off."""
        return self.authenticator.reload() if self.authenticator is not None else False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        self._health.enter_graceful_shutdown()
        self.service.shutdown()
        self._server.stop(grace).wait()
        self.metrics.stop()

    def drain(self, timeout_s: float | None = None, abandon: threading.Event | None = None) -> dict[str, Any]:
        """What SIGTERM does: NOT_SERVING on the health service at once (load balancers and
        orchestrators stop sending robots here), new sessions refused with ``draining``, the blocks
        already in flight answered within ``timeout_s`` (``config.drain_timeout_s``), every other
        session ended with ``draining`` (retryable: robots reopen elsewhere or here once back).
        ``abandon`` (a second signal) cuts the wait short. Call :meth:`stop` after it."""
        self._health.enter_graceful_shutdown()
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        drain = getattr(self.service, "drain", None)  # the Ray Serve front has none: it shuts down
        if drain is None:
            return {}
        return drain(timeout_s, abandon)

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(config: ServerConfig, engine: Any = None,
          make_service: Callable[[ServerConfig, ServerMetrics, TokenAuthenticator | None], Any] | None = None,
          ) -> ServerHandle:
    """Start a server for ``config`` (port 0 picks a free port); ``engine`` overrides loading one.

    ``make_service`` replaces the in-process verifier with another service behind the same
    port, TLS and authentication (the Ray Serve front: ``cloud.ray_serve.serve_fleet``).
    """
    config.validate()
    tokens = check_security(config)
    metrics = ServerMetrics(config.model)
    authenticator = TokenAuthenticator(tokens, config.tokens_file, config.tokens_env) if tokens else None
    if make_service is not None:
        service = make_service(config, metrics, authenticator)
    else:
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        engine = engine if engine is not None else build_engine(config)
        if hasattr(engine, "prefill_chunk_tokens"):  # the config decides, for an engine handed in too
            engine.prefill_chunk_tokens = config.prefill_chunk_tokens
        service = VerificationService(config, engine, metrics, authenticator)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="grpc"),
        # Refuse new streams rather than queueing them behind busy threads.
        # limits.max_sessions stays below this (config.validate), so a refusal always gets a slot.
        maximum_concurrent_rpcs=config.rpc_slots,
        options=[
            ("grpc.max_receive_message_length", config.limits.max_message_bytes),
            ("grpc.max_send_message_length", 1024 * 1024),
            # Robots ping to detect a dead link quickly; allow it.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((service.handler(),))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if config.tls:
        key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
        # With a client CA the handshake itself refuses a client without a certificate it signed.
        client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
        port = server.add_secure_port(config.bind, grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None))
    else:
        port = server.add_insecure_port(config.bind)
    if port == 0:
        raise ConfigError(f"cannot bind {config.bind} (address in use or not local)")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    scheduler = getattr(service, "scheduler", None)  # the Ray Serve front has none: its replicas do
    if scheduler is not None:
        scheduler.watch(lambda reason: _not_serving(health_servicer, reason))
    watch_serving = getattr(service, "watch_serving", None)  # the Ray Serve front: serving while a replica is
    if watch_serving is not None:
        watch_serving(lambda serving, reason: _set_serving(health_servicer, serving, reason))
    address = config.metrics_address
    metrics_port = metrics.serve(address[1], address[0]) if address is not None else None
    log.info("serving", extra={"event": "serving", "port": port, "bind": config.bind, "tls": config.tls,
                               "mtls": bool(config.tls_client_ca), "auth": bool(tokens),
                               "metrics_port": metrics_port, "model": config.model,
                               "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms})
    return ServerHandle(port, metrics_port, config, service, metrics, server, health_servicer, authenticator)


def _not_serving(health_servicer: health.HealthServicer, reason: str) -> None:
    """The verifier cannot verify any more: say so to health checks (and so to the orchestrator)."""
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.error("health: NOT_SERVING", extra={"event": "not_serving", "reason": reason})


def _set_serving(health_servicer: health.HealthServicer, serving: bool, reason: str) -> None:
    """Whether the verifier can verify changed (the Ray Serve front: a replica can again, or none can)."""
    if not serving:
        _not_serving(health_servicer, reason)
        return
    for name in ("", SERVICE_NAME):  # ignored once a drain or stop has begun (graceful shutdown)
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("health: SERVING", extra={"event": "serving_again", "reason": reason})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speculative-vlm-cloud", description=(
        "The cloud verifier: hosts the target model (with early exits) for many robots over gRPC. "
        "Settings come from --config YAML; flags override it."))
    p.add_argument("--config", help="YAML with server settings (see cloud/config.py)")
    p.add_argument("--config-section", help="read this section of --config (e.g. cloud_server of config/sim.yaml)")
    p.add_argument("--model", help="target model folder or model-store name")
    p.add_argument("--exit-layers", help="comma-separated decoder layer indices with early exits")
    p.add_argument("--exit-heads", help="trained exit adapters checkpoint")
    p.add_argument("--device", help="where the target runs: cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", help="the target's dtype: float32, bfloat16 or float16 (default float32)")
    p.add_argument("--max-batch", type=int, help="blocks per forward pass (1 = unbatched)")
    p.add_argument("--max-wait-ms", type=float, help="longest added wait for a batch to fill")
    p.add_argument("--bind", help="host:port (port 0 picks one)")
    p.add_argument("--tls-cert", help="PEM certificate chain")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--tls-client-ca", help="mutual TLS: require client certificates signed by this CA (PEM)")
    p.add_argument("--allow-insecure", action="store_true", default=None,
                   help="allow plaintext on a non-loopback address")
    p.add_argument("--no-auth", action="store_true", help="no authentication (loopback only)")
    p.add_argument("--tokens-file", help="file of 'client-name token' lines")
    p.add_argument("--tokens-env", help="environment variable with name:token,... (default SPECULATIVE_VLM_TOKENS)")
    p.add_argument("--metrics-bind", help="Prometheus /metrics address host:port (port 0 picks one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics on 127.0.0.1:PORT (0 = pick one)")
    p.add_argument("--no-reflection", action="store_true", help="turn gRPC server reflection off")
    p.add_argument("--session-idle-s", type=float, help="expire sessions idle this long")
    p.add_argument("--open-timeout-s", type=float, help="end streams that send no Open within this")
    p.add_argument("--drain-timeout-s", type=float, help="on SIGTERM, how long blocks in flight may take before "
                   "the remaining sessions are ended with 'draining' and the process exits (default 10)")
    p.add_argument("--prefill-chunk-tokens", type=int, help="prompt tokens prefilled between verifications")
    p.add_argument("--torch-threads", type=int, help="torch CPU threads")
    p.add_argument("--max-image-bytes", type=int, help="largest JPEG accepted")
    p.add_argument("--max-sessions", type=int, help="streams on the server, opened or not (< workers - 2)")
    p.add_argument("--max-sessions-per-client", type=int, help="streams per client, opened or not")
    p.add_argument("--max-prompt-tokens", type=int, help="prompt tokens after the chat template and image")
    p.add_argument("--kv-budget-mb", type=float, help="memory for all sessions' KV caches")
    p.add_argument("--requests-per-second", type=float, help="per-client request rate")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING")
    ray = p.add_argument_group("scale-out on Ray Serve (cloud/ray_serve.py; needs ray[serve])")
    ray.add_argument("--ray", action="store_true", help="serve from --replicas verifier replicas on Ray Serve "
                     "behind this one address, each session pinned to its replica")
    ray.add_argument("--replicas", type=int, help="verifier replicas with --ray (default 2)")
    ray.add_argument("--ray-address", help="join this Ray cluster ('auto' or host:port); default: start a "
                     "local one")
    ray.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs Ray gives each replica")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.config_section and not args.config:
        raise ConfigError("--config-section names a section of --config: give --config too")
    config = from_yaml(args.config, args.config_section) if args.config else ServerConfig()
    changes: dict[str, Any] = {}
    for name in ("model", "exit_heads", "device", "dtype", "max_batch", "max_wait_ms", "bind", "tls_cert", "tls_key",
                 "allow_insecure", "tls_client_ca", "tokens_file", "tokens_env", "metrics_bind", "metrics_port",
                 "session_idle_s", "open_timeout_s", "prefill_chunk_tokens", "torch_threads", "log_level",
                 "drain_timeout_s"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.exit_layers is not None:
        changes["exit_layers"] = tuple(int(x) for x in args.exit_layers.split(",") if x.strip())
    if args.no_auth:
        changes["require_auth"] = False
    if args.no_reflection:
        changes["reflection"] = False
    # A metrics flag replaces the file's endpoint, whichever way the file gave it (both flags: an error).
    if args.metrics_bind is not None and args.metrics_port is None:
        changes["metrics_port"] = None
    elif args.metrics_port is not None and args.metrics_bind is None:
        changes["metrics_bind"] = None
    limit_changes = {name: getattr(args, name) for name in (
        "max_image_bytes", "max_sessions", "max_sessions_per_client", "max_prompt_tokens", "kv_budget_mb",
        "requests_per_second")
                     if getattr(args, name) is not None}
    if limit_changes:
        import dataclasses

        changes["limits"] = dataclasses.replace(config.limits, **limit_changes)
    return config.replace(**changes).validate() if changes else config


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"speculative-vlm-cloud: {exc}")
        return 2
    if not args.ray and (args.replicas is not None or args.ray_address):
        print("speculative-vlm-cloud: --replicas and --ray-address go with --ray")
        return 2
    logs.configure(config.log_level)
    try:
        if args.ray:
            from speculative_vlm.cloud.ray_serve import serve_fleet

            handle = serve_fleet(config, 2 if args.replicas is None else args.replicas, ray_address=args.ray_address,
                                 gpus_per_replica=args.gpus_per_replica)
        else:
            handle = serve(config)
    except (ConfigError, AuthConfigError, PlacementError) as exc:
        log.error(str(exc), extra={"event": "refused_to_start"})
        return 2
    done, abandon = threading.Event(), threading.Event()
    signalled: list[float] = []

    def on_signal(*_: object) -> None:
        signalled.append(time.monotonic())
        if done.is_set():
            abandon.set()  # a second signal: stop draining, end the sessions left now
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    # Token rotation: `kill -HUP <pid>` reads the tokens file again (it is also re-read when it changes).
    signal.signal(signal.SIGHUP, lambda *_: handle.reload_tokens())
    done.wait()
    # Health says NOT_SERVING from here; blocks in flight are answered, then every session is
    # ended with the retryable `draining` code, so robots re-decode their step elsewhere or here
    # once the server is back (README: restarts and rollouts).
    log.info("draining", extra={"event": "draining", "drain_timeout_s": config.drain_timeout_s})
    counts = handle.drain(config.drain_timeout_s, abandon)
    log.info("drained", extra={"event": "drained", **counts,
                               "after_signal_s": round(time.monotonic() - signalled[0], 4)})
    # Streams have been told; their threads free the caches. Prefills stop at their next chunk.
    handle.stop(grace=1.0)
    log.info("stopped", extra={"event": "stopped",
                               "after_signal_s": round(time.monotonic() - signalled[0], 4)})
    return 0


__all__ = ["ServerLimits", "ServerConfig", "ServerHandle", "serve", "main", "InsecureBind"]


if __name__ == "__main__":
    raise SystemExit(main())
