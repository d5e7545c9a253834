"""Scale-out on Ray Serve: several verifier replicas behind one gRPC address, each session
pinned to the replica that holds its KV cache.

The shape:

* **Replicas** (:class:`VerifierReplica`, a Ray Serve deployment): each one is a whole
  in-process verifier, the same :class:`~speculative_vlm.cloud.service.VerificationService`
  as a single server (target engine, batch scheduler, sessions and their KV caches, prompt
  and memory admission, idle expiry), without a port. A session is one long streaming call
  (:meth:`VerifierReplica.session`) that yields the session's server messages (Opened, Early,
  Final, Dropped, Token, Error) as they come; the client's messages reach it one by one
  through :meth:`VerifierReplica.send`.
* **The front** (:class:`FleetFront`): the gRPC server robots talk to (``cloud.server`` with
  its TLS, health service and message limits), which authenticates each stream, holds the
  fleet-wide session limits, and forwards the stream's bytes to a replica through a
  :class:`~ray.serve.handle.DeploymentHandle`. Protobuf is parsed only in the replica.
* **Affinity** (:class:`SessionPinnedRouter`, a Ray Serve request router): a session's first
  call carries no replica and goes to the replica with the fewest requests in flight (each
  open session holds one, its stream), so sessions spread by load. The replica names itself
  in its stream's first item; every later call of that session carries ``<replica>@<key>``
  as its Ray Serve ``session_id`` and is routed to that replica and no other.

Why not Ray Serve's own pieces: its gRPC proxy (2.60) does carry bidirectional streams, but
has no TLS, no per-server message-size or keepalive settings and its own health service, and
our robots need TLS and bearer tokens off loopback; so the front is ours. Its
consistent-hash router (``ray.serve.experimental.consistent_hash_router``, keyed on
``session_id``) was tried first: it keeps a session on one replica while the replica set is
unchanged, but when Ray Serve starts a replacement for a dead replica the ring changes and
live sessions of the *surviving* replica move too (seen here: 1 of its 10 sessions), and it
places sessions by hash, not by load (22 and 10 of 32). A session's KV cache cannot move,
so the replica is pinned explicitly instead.

A replica that dies loses only its sessions: their streams end with the retryable
``replica_lost`` code (``protocol.errors``; the robot sees ``LinkLost`` and reopens, and
the new session goes to a live replica); the other replicas' sessions go on, and Ray Serve
starts a replacement, which takes new sessions. A replica whose verification broke for good
(its batch scheduler is broken) fails Ray Serve's health check and is replaced the same way.

Operations: the front's gRPC health is SERVING while at least one replica answers and can
verify (the front asks Ray Serve's controller how many run, then the running ones, every
``HEALTH_PERIOD_S``), NOT_SERVING, with the reason logged,
while none can (all dead, all broken, or none started yet), and SERVING again once a
replacement can. The front's ``/metrics`` serves its own series (streams, the fleet's
refusals, ``svlm_replicas_serving``) and, asked of every replica at each scrape, each replica's
verification metrics with a ``replica`` label (the replica id that session ids start with).
Ray's own metrics export was not used for them: it would need the metrics written twice
(``ray.util.metrics`` in the replicas), is scraped per Ray node from Ray's agent rather than
at the front's ``--metrics-bind``, and its names and labels are Ray's, so the Grafana
dashboard of a single server would not apply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Gauge

from speculative_vlm.cloud.auth import AuthThrottle, TokenAuthenticator
from speculative_vlm.cloud.config import ConfigError, ServerConfig
from speculative_vlm.cloud.limits import LimitExceeded
from speculative_vlm.cloud.metrics import ServerMetrics
from speculative_vlm.cloud.service import (
    DRAINING_REASON,
    SERVICE_NAME,
    authenticate_stream,
    deserialize_client_message,
    end_rpc,
)
from speculative_vlm.decoding.sessions import ServedSession, SessionStore
from speculative_vlm.protocol import convert, errors

try:  # the cloud's optional extra: the robot never imports this module
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("Ray Serve scale-out needs ray[serve] (requirements/lock.txt pins it): "
                      "pip install 'ray[serve]'") from exc

log = logging.getLogger("speculative_vlm.cloud.ray_serve")

APP_NAME = "speculative_vlm_verifier"
DEPLOYMENT_NAME = "VerifierReplica"
# Separates the replica from the session key in a pinned Ray Serve session_id.
PIN = "@"
ROUTER_CLASS = "speculative_vlm.cloud.ray_serve:SessionPinnedRouter"
# How long the front waits for a replica to take one client message before the session is lost.
SEND_TIMEOUT_S = 30.0
# Sessions whose placement the front remembers (for operators and tests), most recent last.
PLACEMENTS_KEPT = 4096
# How often the front asks every replica whether it can verify (its gRPC health follows), and how long
# it waits for the replicas' answers (to that, and to a scrape's request for their metrics).
HEALTH_PERIOD_S = 1.0
REPLICA_CALL_TIMEOUT_S = 5.0


def pinned(replica: str, key: str) -> str:
    """The Ray Serve ``session_id`` that routes a call to ``replica`` (its unique id)."""
    return f"{replica}{PIN}{key}"


class SessionPinnedRouter(RequestRouter):
    """Routes a pinned call (``session_id`` = ``<replica>@<key>``) to that replica only; any
    other call to the least busy replica.

    "Least busy" is the base router's choice among the candidates: the lowest number of
    requests in flight, from its queue-length cache or a probe. A session's stream is one
    such request for the session's whole life, so new sessions go where fewest are open.
    When the pinned replica is gone, the call goes to any replica, which does not know the
    session and says so; the front then ends the session with ``replica_lost``.
    """

    _turns = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.metadata.session_id if pending_request is not None else ""
        replica, sep, _ = (key or "").partition(PIN)
        if sep:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == replica]
            if chosen:
                # A full replica is waited for (with back-off), never swapped for another.
                pending_request.routing_context.should_backoff = True
                return [chosen]
        if not candidate_replicas:
            return []
        # Among equally busy replicas the base router takes the first: rotate, so ties alternate.
        turn = next(self._turns) % len(candidate_replicas)
        return [candidate_replicas[turn:] + candidate_replicas[:turn]]


# ---- the replica ------------------------------------------------------------------------------
class _FrontAuthenticated:
    """The replica's authenticator: the front has already authenticated the stream and names
    its client in the metadata it passes on, so per-client limits count the real client."""

    KEY = "svlm-front-client"

    def client_for(self, metadata: Any) -> str:
        return dict(metadata or ())[self.KEY]


class _StreamContext:
    """What :meth:`VerificationService.session` uses of a ``grpc.ServicerContext``, for a
    stream that arrives through Ray: its peer, its client, how it ended, and the callbacks
    to run if the front goes away."""

    def __init__(self, peer: str, client: str):
        self._peer = peer
        self._metadata = ((_FrontAuthenticated.KEY, client),)
        self._callbacks: list[Any] = []
        self.code: str | None = None  # the project's error code the stream was refused with
        self.details = ""

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def add_callback(self, callback: Any) -> bool:
        self._callbacks.append(callback)
        return True

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.code = errors.code_in(metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        pass  # the front ends its own RPC with the status of self.code's row

    def set_details(self, details: str) -> None:
        self.details = details

    def cancelled(self) -> None:
        for callback in self._callbacks:
            callback()


_DONE = object()


class VerifierReplica:
    """One replica: a target model and its sessions. Deployed by :func:`start_fleet`.

    Every method takes the session's key (chosen by the front); a replica that does not hold
    the session answers ``send`` with ``None``.
    """

    def __init__(self, config: ServerConfig):
        from ray import serve

        from speculative_vlm.cloud.server import build_engine
        from speculative_vlm.cloud.service import VerificationService

        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        engine = build_engine(config)
        if hasattr(engine, "prefill_chunk_tokens"):
            engine.prefill_chunk_tokens = config.prefill_chunk_tokens
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.service = VerificationService(config, engine, ServerMetrics(config.model), _FrontAuthenticated())
        self._inboxes: dict[str, queue.Queue[Any]] = {}
        # Client messages each session's key brought to this replica (what pinning is judged by).
        self._received: OrderedDict[str, int] = OrderedDict()
        self._names: dict[str, str] = {}  # key -> the session id the robot sees

    async def session(self, key: str, client: str, peer: str) -> AsyncIterator[Any]:
        """The session's stream: first ``("replica", id)``, then each server message as bytes,
        and, if the service refused the stream, ``("refused", code, reason)`` last."""
        inbox: queue.Queue[Any] = queue.Queue()
        self._inboxes[key] = inbox
        self._received[key] = 0
        while len(self._received) > PLACEMENTS_KEPT:
            self._received.popitem(last=False)
        context = _StreamContext(peer, client)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Any] = asyncio.Queue()

        def pump() -> None:
            # The service's stream is blocking (a queue per session); it runs on its own thread.
            try:
                for message in self.service.session(iter(inbox.get, _DONE), context):
                    loop.call_soon_threadsafe(out.put_nowait, message)
            except BaseException as exc:  # handed to the stream, which raises it to the front
                loop.call_soon_threadsafe(out.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(out.put_nowait, _DONE)

        threading.Thread(target=pump, daemon=True, name=f"replica-session-{key}").start()
        finished = False
        try:
            yield ("replica", self.replica)
            while (item := await out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if item.WhichOneof("kind") == "opened":
                    # Fleet-wide unique, and it names the replica: "<replica>/<replica's own id>".
                    item.opened.session_id = self._names[key] = f"{self.replica}/{item.opened.session_id}"
                yield item.SerializeToString()
            finished = True
            if context.code is not None:
                yield ("refused", context.code, context.details)
        finally:
            self._inboxes.pop(key, None)
            inbox.put(_DONE)  # the service's reader stops waiting for client messages
            if not finished:  # the front went away (robot gone, or the front stopping)
                context.cancelled()

    async def send(self, key: str, data: bytes) -> str | None:
        """One client message of the session: this replica's id when taken, "" when the session
        has already ended here (the message is dropped, as a stream's late messages are), None
        when this replica never held it."""
        inbox = self._inboxes.get(key)
        if inbox is None:
            return "" if key in self._received else None
        self._received[key] = self._received.get(key, 0) + 1
        inbox.put(deserialize_client_message(data))
        return self.replica

    async def end(self, key: str) -> None:
        """The client stopped sending (its half of the stream closed)."""
        inbox = self._inboxes.get(key)
        if inbox is not None:
            inbox.put(_DONE)

    async def drain(self, timeout_s: float) -> dict[str, int]:
        """This replica's part of a drain (``VerificationService.drain``): refuse new work, answer
        the blocks in flight within ``timeout_s``, end every session with ``draining``."""
        return await asyncio.to_thread(self.service.drain, timeout_s)

    async def received(self) -> dict[str, int]:
        """{session id the robot saw: client messages it brought here} for recent sessions."""
        return {self._names.get(key, key): n for key, n in self._received.items()}

    async def replica_id(self) -> str:
        return self.replica

    async def health(self) -> tuple[str, str | None]:
        """(this replica's id, why it cannot verify or None): what the front's health is made of."""
        return self.replica, self.service.scheduler.broken

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose verification broke for good (its scheduler's
        thread died, or a whole pass raised: a lost device) fails it, so Ray Serve stops routing
        to it and starts a replacement."""
        broken = self.service.scheduler.broken
        if broken is not None:
            raise RuntimeError(f"replica {self.replica} cannot verify any more: {broken}")

    async def metric_families(self) -> tuple[str, list[Any]]:
        """(this replica's id, its metric families) for the front's /metrics."""
        return self.replica, list(self.service.metrics.registry.collect())


# ---- the fleet ------------------------------------------------------------------------------
@dataclass
class Fleet:
    """Replicas running on Ray Serve: ``handle`` reaches them; ``stop()`` ends them (and the
    local Ray cluster, if this process started it)."""

    handle: Any
    replicas: int
    started_ray: bool
    stopped: bool = False

    def call(self, method: str, replica: str | None = None, key: str = "") -> Any:
        """A handle to ``method``, pinned to ``replica`` when given."""
        options = {"session_id": pinned(replica, key or "probe")} if replica else {}
        return getattr(self.handle.options(**options), method)

    def replica_actors(self) -> dict[str, Any]:
        """{replica unique id: its Ray actor} of the live replicas (``ray.kill`` one to test a loss)."""
        import ray

        prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
        return {a["name"][len(prefix):]: ray.get_actor(a["name"], namespace=a["namespace"])
                for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}

    def stop(self) -> None:
        import ray
        from ray import serve

        if self.stopped:
            return
        self.stopped = True
        try:
            serve.delete(APP_NAME)
        finally:
            if self.started_ray:
                serve.shutdown()
                ray.shutdown()


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start a local one on loopback (no dashboard);
    True when this call started a cluster. Nothing happens if Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    return True


def start_fleet(config: ServerConfig, replicas: int, *, ray_address: str | None = None,
                cpus_per_replica: float = 0.0, gpus_per_replica: float = 0.0, num_cpus: int | None = None,
                health_check_period_s: float = 2.0) -> Fleet:
    """Deploy ``replicas`` verifier replicas of ``config.model`` on Ray Serve and wait until
    all have loaded the model.

    ``ray_address`` joins an existing cluster (``"auto"`` or ``host:port``); without it a local
    cluster is started on loopback. ``gpus_per_replica`` 1 gives each replica its own GPU
    (with a cuda device configured for the model).
    """
    if replicas < 1:
        raise ConfigError(f"replicas must be >= 1, got {replicas}")
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    started_ray = init_ray(ray_address, num_cpus)
    serve.start(proxy_location="Disabled")
    limits = config.limits
    deployment = serve.deployment(
        VerifierReplica, name=DEPLOYMENT_NAME, num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # Each open session holds one request (its stream) for its life; its messages are more.
        max_ongoing_requests=2 * limits.max_sessions + 16,
        health_check_period_s=health_check_period_s,
        # The front cancels every session's stream before deleting the replicas: nothing to wait for.
        graceful_shutdown_timeout_s=5.0,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS))
    started = time.monotonic()
    handle = serve.run(deployment.bind(config), name=APP_NAME, route_prefix=None)
    log.info("replicas up", extra={"event": "replicas_up", "replicas": replicas, "model": config.model,
                                   "after_s": round(time.monotonic() - started, 2)})
    return Fleet(handle, replicas, started_ray)


# ---- the front --------------------------------------------------------------------------------
class _ReplicaLost(Exception):
    """The replica holding a session died or no longer knows it."""


def _lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions
    from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

    return (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, RequestCancelledError,
            DeploymentUnavailableError, ray.exceptions.RayTaskError, _ReplicaLost)


class FleetFront:
    """The gRPC service in front of the replicas: authentication, the fleet's session limits,
    and each stream forwarded to its replica. Built by :func:`serve_fleet` through
    ``cloud.server.serve`` (which owns the port, TLS, health and message limits)."""

    def __init__(self, config: ServerConfig, fleet: Fleet, metrics: ServerMetrics,
                 authenticator: TokenAuthenticator | None):
        self.config = config
        self.fleet = fleet
        self.metrics = metrics
        self.auth = authenticator
        limits = config.limits
        self.store = SessionStore(config.session_idle_s)  # streams, for the fleet-wide limits
        self.auth_throttle = AuthThrottle(limits.auth_max_failures, limits.auth_window_s,
                                          limits.auth_lockout_s, limits.auth_max_lockout_s)
        self.lost_errors = _lost_errors()
        # Each session's replica, as the robot sees the session: {Opened.session_id: replica}.
        self.placements: OrderedDict[str, str] = OrderedDict()
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self._streams: dict[str, Any] = {}  # key -> the session's Ray stream, while it runs
        self._lock = threading.Lock()
        # Whether any replica can verify (start_fleet waited for all of them), and why not.
        self.serving: tuple[bool, str] = (True, "replicas started")
        self._serving_watchers: list[Callable[[bool, str], None]] = []
        self.replicas_serving = Gauge("svlm_replicas_serving", "verifier replicas that answer the front and can "
                                      "verify (Ray Serve front only)", ["model"],
                                      registry=metrics.registry).labels(config.model)
        self.replicas_serving.set(fleet.replicas)
        metrics.merge(self._replica_metrics)
        threading.Thread(target=self._watch_replicas, daemon=True, name="front-health").start()

    # -- what operators see: health and metrics of the replicas --------------------------------------
    def watch_serving(self, on_change: Callable[[bool, str], None]) -> None:
        """Call ``on_change(serving, reason)`` whenever whether any replica can verify changes (at once if
        none can now). ``cloud.server.serve`` hands it the gRPC health service's setter."""
        with self._lock:
            self._serving_watchers.append(on_change)
            serving, reason = self.serving
        if not serving:
            on_change(serving, reason)

    def _ask(self, method: str) -> dict[str, Any]:
        """Every live replica's answer to ``method``, asked at once: {replica: its answer, or the
        exception when it gave none within ``REPLICA_CALL_TIMEOUT_S`` or was lost}."""
        calls = {replica: self.fleet.call(method, replica).remote() for replica in self.fleet.replica_actors()}
        deadline = time.monotonic() + REPLICA_CALL_TIMEOUT_S
        answers: dict[str, Any] = {}
        for replica, call in calls.items():
            try:
                answers[replica] = call.result(timeout_s=max(0.01, deadline - time.monotonic()))
            except (TimeoutError, *self.lost_errors) as exc:
                call.cancel()
                answers[replica] = exc
        return answers

    def _replicas_running(self) -> tuple[int, str]:
        """(how many replicas Ray Serve's controller has RUNNING, every state it counts).

        Asked before the replicas themselves: a health call made while no replica runs waits in
        the handle's queue for up to ``REPLICA_CALL_TIMEOUT_S`` and is then answered by a
        replacement that became ready meanwhile, which would hide the gap."""
        from ray import serve

        app = serve.status().applications.get(APP_NAME)
        deployment = app.deployments.get(DEPLOYMENT_NAME) if app is not None else None
        states = {str(getattr(state, "value", state)): count
                  for state, count in (deployment.replica_states if deployment is not None else {}).items()}
        counts = ", ".join(f"{state} {count}" for state, count in sorted(states.items())) or "no replicas"
        return states.get("RUNNING", 0), counts

    def _replicas_serving(self) -> tuple[list[str], str]:
        """(the replicas that can verify, why each other cannot)."""
        running, counts = self._replicas_running()
        if not running:
            return [], f"no verifier replica is running (Ray Serve: {counts})"
        serving, problems = [], []
        for replica, answer in self._ask("health").items():
            if isinstance(answer, BaseException):
                problems.append(f"{replica}: no answer ({type(answer).__name__})")
            elif answer[0] != replica:  # routed elsewhere: the replica is still starting, or gone
                problems.append(f"{replica}: not running")
            elif answer[1] is not None:
                problems.append(f"{replica}: {answer[1]}")
            else:
                serving.append(replica)
        return serving, "; ".join(problems) or "no verifier replica is running"

    def _watch_replicas(self) -> None:
        while not self._stopping.wait(HEALTH_PERIOD_S):
            try:
                serving, problems = self._replicas_serving()
            except Exception as exc:  # Ray itself cannot be asked (the cluster went away)
                serving, problems = [], f"cannot ask the replicas ({exc!r})"
            if self._stopping.is_set() or self.fleet.stopped:  # stopped, or the front never started
                return
            self.replicas_serving.set(len(serving))
            self.metrics.scheduler_up.set(1 if serving else 0)
            now = (True, f"replicas serving: {', '.join(serving)}") if serving else \
                (False, f"no verifier replica can verify: {problems}")
            with self._lock:
                changed, self.serving = now[0] != self.serving[0], now
                watchers = list(self._serving_watchers) if changed else []
            if changed:
                (log.info if now[0] else log.error)("fleet serving" if now[0] else "fleet not serving", extra={
                    "event": "fleet_serving" if now[0] else "fleet_not_serving", "reason": now[1]})
            for on_change in watchers:
                on_change(*now)

    def _replica_metrics(self) -> list[tuple[dict[str, str], list[Any]]]:
        """Every live replica's metric families, labelled with its id (``ServerMetrics.merge``: at each scrape)."""
        if self._stopping.is_set():
            return []
        return [({"replica": replica}, answer[1]) for replica, answer in self._ask("metric_families").items()
                if not isinstance(answer, BaseException) and answer[0] == replica]

    # -- sessions --------------------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        # Bytes in, bytes out: the replica parses (and refuses what does not parse).
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Session": grpc.stream_stream_rpc_method_handler(self.session),
        })

    def session(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = context.peer()
        address = peer.rsplit(":", 1)[0]
        client = "?"
        try:
            if self._stopping.is_set():
                raise LimitExceeded("server_shutdown", "the server is shutting down; reconnect and open "
                                    "a new session")
            if self._draining.is_set():
                raise LimitExceeded("draining", DRAINING_REASON)
            client = authenticate_stream(self.auth, self.auth_throttle, address, context)
            place = ServedSession(client=client, peer=peer)
            limits = self.config.limits
            self.store.admit(place, limits.max_sessions, limits.max_sessions_per_client)
        except LimitExceeded as exc:
            yield from self._refuse(context, exc.code, exc.reason, client, peer)
            return
        self.metrics.streams.inc()
        key = uuid.uuid4().hex[:16]
        stream = self.fleet.call("session").options(stream=True).remote(key, client, peer)
        with self._lock:
            self._streams[key] = stream
        if self._stopping.is_set():  # shutdown() may have missed it
            stream.cancel()
        lost: list[str] = []
        context.add_callback(stream.cancel)  # the robot went away: the replica closes the session
        try:
            kind, replica = next(stream)
            assert kind == "replica", kind
            threading.Thread(target=self._forward, args=(requests, stream, replica, key, lost), daemon=True,
                             name=f"front-{key}").start()
            first = True
            for item in stream:
                if isinstance(item, bytes):
                    if first:  # Opened (or the Error that refused the Open)
                        self._remember(item, replica)
                        first = False
                    yield item
                else:
                    _, code, reason = item
                    end_rpc(context, code, reason)
        except self.lost_errors as exc:
            if self._stopping.is_set():
                yield from self._refuse(context, "server_shutdown", "the server is shutting down; reconnect and "
                                        "open a new session", client, peer)
                return
            if not lost and not context.is_active():
                return  # the robot left: nobody to tell
            reason = lost[0] if lost else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            yield from self._refuse(context, "replica_lost", f"the verifier replica holding this session was "
                                    f"lost ({reason}); open a new session (another replica takes it)",
                                    client, peer)
        finally:
            stream.cancel()
            with self._lock:
                self._streams.pop(key, None)
            self.store.remove(place)
            self.metrics.streams.dec()

    def _remember(self, data: bytes, replica: str) -> None:
        from speculative_vlm.protocol import verifier_pb2 as pb

        message = pb.ServerMessage.FromString(data)
        if message.WhichOneof("kind") == "opened":
            self.placements[message.opened.session_id] = replica
            while len(self.placements) > PLACEMENTS_KEPT:
                self.placements.popitem(last=False)

    def _forward(self, requests: Iterator[bytes], stream: Any, replica: str, key: str, lost: list[str]) -> None:
        """The robot's messages, in order, to the session's replica; the session is lost if it
        does not take one."""
        send = self.fleet.call("send", replica, key)
        try:
            for data in requests:
                taken = send.remote(key, data).result(timeout_s=SEND_TIMEOUT_S)
                if taken == "":
                    return  # the session ended on its replica; its stream is ending
                if taken != replica:
                    raise _ReplicaLost(f"replica {replica} no longer holds session {key}")
            self.fleet.call("end", replica, key).remote(key).result(timeout_s=SEND_TIMEOUT_S)
        except self.lost_errors as exc:
            lost.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            stream.cancel()
        except Exception as exc:  # the robot's side of the stream broke: the callback cancels the stream
            log.debug("front read ended", extra={"event": "read_end", "session": key, "error": repr(exc)})

    def _refuse(self, context: grpc.ServicerContext, code: str, reason: str, client: str,
                peer: str) -> Iterator[bytes]:
        self.metrics.refusals.labels(code).inc()
        log.warning("refused", extra={"event": "refused", "code": code, "reason": reason, "client": client,
                                      "peer": peer})
        yield convert.error(code, reason).SerializeToString()
        end_rpc(context, code, reason)

    def drain(self, timeout_s: float, abandon: threading.Event | None = None) -> dict[str, int]:
        """What SIGTERM does (``ServerHandle.drain``), fleet-wide: new sessions are refused with
        ``draining`` here, and every replica drains its own sessions at once (answers the blocks
        in flight within ``timeout_s``, then ends each session with ``draining``, which reaches
        the robot through its stream). ``abandon`` stops waiting for the replicas left."""
        self._draining.set()
        calls = {replica: self.fleet.call("drain", replica).remote(timeout_s)
                 for replica in self.fleet.replica_actors()}
        counts: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s + 10.0  # the replicas' own deadline, and the calls
        for replica, call in calls.items():
            if abandon is not None and abandon.is_set():
                break  # a second signal: stop() cancels the streams left
            try:
                got = call.result(timeout_s=max(0.1, deadline - time.monotonic()))
            except (TimeoutError, *self.lost_errors) as exc:  # a dead replica has no sessions to drain
                log.warning("replica drain failed", extra={"event": "drain_failed", "replica": replica,
                                                            "error": repr(exc)})
                continue
            for name, n in got.items():
                counts[name] = counts.get(name, 0) + n
        return counts

    def shutdown(self) -> None:
        """Stop taking sessions, end every open one with ``server_shutdown``, then the replicas."""
        self._stopping.set()
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:  # the replicas close these sessions; the robots are told why
            stream.cancel()
        self.fleet.stop()


def serve_fleet(config: ServerConfig, replicas: int, **fleet_options: Any) -> Any:
    """Start the replicas and the gRPC front on ``config.bind``; returns the server's handle
    (``cloud.server.ServerHandle``: ``port``, ``stop()``, ``service`` = the :class:`FleetFront`)."""
    from speculative_vlm.cloud.server import serve

    config.validate()
    fleet = start_fleet(config, replicas, **fleet_options)
    try:
        return serve(config, make_service=lambda cfg, metrics, auth: FleetFront(cfg, fleet, metrics, auth))
    except BaseException:
        fleet.stop()
        raise
