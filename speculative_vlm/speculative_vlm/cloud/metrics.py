"""Prometheus metrics of one verifier server (its own registry, so several servers can share a process).

Every metric carries a ``model`` label (the served target, as vLLM's ``model_name``), so one
Prometheus can scrape several verifiers and a dashboard can compare them. The speculative
decoding counters follow vLLM's ``spec_decode_*`` metrics: acceptance is
``accepted_tokens / draft_tokens``, and, because the robot's draft length is adaptive, the
acceptance at position i is ``accepted_tokens_per_pos{position=i} / draft_tokens_per_pos{position=i}``.
An early verdict is judged when its block's final verdict is known: a *hit* when it named the
same accepted prefix and next token (what the robot's preemptive draft needs), else a *miss*.

``speculative_vlm/config/grafana/verifier-dashboard.json`` plots these metrics; the README lists them.

A server can serve other registries' samples with its own (:meth:`ServerMetrics.merge`): the Ray
Serve front (``cloud.ray_serve``) serves every replica's metrics, each sample labelled with its
``replica``, in the same families as its own, so one scrape of the front sees the whole fleet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric

# Other registries' samples to serve with a server's own, asked for at each scrape: (extra labels,
# metric families) per source, e.g. ({"replica": "ab12cd34"}, that replica's families).
LabelledFamilies = Iterable[tuple[dict[str, str], Iterable[Metric]]]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _ModelLabelled:
    """A labelled metric with its ``model`` label filled in: ``.labels(code)`` gives the rest."""

    def __init__(self, metric: Any, model: str):
        self._metric, self._model = metric, model

    def labels(self, *values: str) -> Any:
        return self._metric.labels(self._model, *values)


class ServerMetrics:
    """The server's metrics; the attributes are ready to ``inc``/``set``/``observe`` for ``model``.

    Metrics with labels besides ``model`` (rounds by outcome, refusals by code, per-position
    and per-exit-layer counters) are used as ``metrics.refusals.labels(code).inc()``.
    """

    def __init__(self, model: str = "") -> None:
        self.model = model
        self.registry = CollectorRegistry()

        def gauge(name: str, text: str) -> Any:
            return Gauge(name, text, ["model"], registry=self.registry).labels(model)

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Any:
            metric = Counter(name, text, ["model", *labels], registry=self.registry)
            return _ModelLabelled(metric, model) if labels else metric.labels(model)

        def histogram(name: str, text: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Any:
            metric = Histogram(name, text, ["model", *labels], buckets=buckets, registry=self.registry)
            return _ModelLabelled(metric, model) if labels else metric.labels(model)

        # -- sessions and streams
        self.sessions_open = gauge("svlm_sessions_open", "sessions open now (prefilled, holding a KV cache)")
        self.streams = gauge("svlm_streams", "streams now, opened or not (each holds an RPC slot)")
        self.kv_reserved_bytes = gauge("svlm_kv_reserved_bytes", "KV-cache memory reserved by sessions")
        self.sessions_total = counter("svlm_sessions", "sessions opened")
        self.refusals = counter("svlm_refusals", "requests refused, by error code (protocol.errors)", ("code",))
        self.scheduler_up = gauge("svlm_scheduler_up", "1 while the verification thread works; 0 once it "
                                  "died or a whole pass raised (health is then NOT_SERVING)")
        self.time_to_first_token = histogram(
            "svlm_time_to_first_token_seconds", "from a session's Open arriving to its first output token "
            "(first final verdict, or first streamed token); includes the prefill and the robot's first draft",
            TTFT_BUCKETS, ("mode",))
        # -- speculative decoding (vLLM's spec_decode_* counters)
        self.drafts = counter("svlm_spec_decode_drafts", "draft blocks verified (final verdicts)")
        self.draft_tokens = counter("svlm_spec_decode_draft_tokens", "draft tokens in verified blocks")
        self.accepted = counter("svlm_spec_decode_accepted_tokens", "draft tokens accepted")
        self.draft_tokens_per_pos = counter("svlm_spec_decode_draft_tokens_per_pos",
                                            "draft tokens verified at each block position (0 = first)",
                                            ("position",))
        self.accepted_per_pos = counter("svlm_spec_decode_accepted_tokens_per_pos",
                                        "draft tokens accepted at each block position (0 = first)", ("position",))
        self.rounds_total = counter("svlm_rounds", "draft blocks answered: verified, or dropped (their assumed "
                                    "prefix did not hold)", ("outcome",))
        self.accepted_tokens = histogram("svlm_accepted_tokens", "draft tokens accepted per verified block",
                                         (0, 1, 2, 3, 4, 5, 6, 8, 12, 16))
        self.accepted_per_pass = histogram("svlm_accepted_tokens_per_pass",
                                           "draft tokens accepted in one forward pass, all sessions together",
                                           (0, 1, 2, 4, 8, 12, 16, 24, 32, 64))
        self.early_verdicts = counter("svlm_early_verdicts", "early verdicts sent, by exit layer", ("exit_layer",))
        self.early_hits = counter("svlm_early_verdict_hits", "early verdicts that named the final verdict's "
                                  "accepted prefix and next token", ("exit_layer",))
        self.early_misses = counter("svlm_early_verdict_misses", "early verdicts the final verdict contradicted",
                                    ("exit_layer",))
        self.tokens_generated = counter("svlm_autoregressive_tokens", "tokens generated in autoregressive mode")
        # -- the model's time
        self.batch_size = histogram("svlm_batch_size", "blocks per target forward pass",
                                    (1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.verify_latency = histogram("svlm_verify_latency_seconds", "time of one batched verification pass",
                                        LATENCY_BUCKETS)
        self.model_wait = histogram("svlm_model_wait_seconds", "time a verification pass (or a close, or an "
                                    "autoregressive step) waited for the model, e.g. behind a prefill chunk",
                                    (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5))
        self.queue_wait = histogram("svlm_queue_wait_seconds", "time a block waited for its batch",
                                    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
        self.scheduler_up.set(1)
        self._http: Any = None
        self._merged: list[Callable[[], LabelledFamilies]] = []
        # What /metrics serves: this registry's families with the merged sources' samples in them.
        self._exposed = CollectorRegistry(auto_describe=False)
        self._exposed.register(_Exposition(self))

    def observe_verified(self, drafted: int, accepted: int) -> None:
        """One block's final verdict: ``accepted`` of its ``drafted`` tokens were accepted."""
        self.drafts.inc()
        self.draft_tokens.inc(drafted)
        self.accepted.inc(accepted)
        for position in range(drafted):
            self.draft_tokens_per_pos.labels(str(position)).inc()
        for position in range(accepted):
            self.accepted_per_pos.labels(str(position)).inc()

    def observe_early(self, exit_layer: int, hit: bool) -> None:
        """An early verdict from ``exit_layer``, judged against its block's final verdict."""
        (self.early_hits if hit else self.early_misses).labels(str(exit_layer)).inc()

    def merge(self, source: Callable[[], LabelledFamilies]) -> None:
        """Serve, with this server's own samples, those ``source()`` returns at each scrape, each
        sample with its source's extra labels, in the family of the same name (a family this
        server lacks is served as it comes)."""
        self._merged.append(source)

    def exposition(self) -> Iterable[Metric]:
        """The families /metrics serves: this server's, with every merged source's samples in them."""
        families = {family.name: family for family in self.registry.collect()}  # fresh objects per collect
        for source in self._merged:
            for labels, theirs in source():
                for other in theirs:
                    family = families.get(other.name)
                    if family is None:
                        family = families[other.name] = Metric(other.name, other.documentation, other.type,
                                                               other.unit)
                    elif family.type != other.type:  # never between two ServerMetrics: left out, not mixed in
                        continue
                    family.samples.extend(s._replace(labels={**s.labels, **labels}) for s in other.samples)
        return list(families.values())

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose /metrics on ``addr:port`` (0 = a free port); returns the port."""
        self._http, _thread = start_http_server(port, addr=addr, registry=self._exposed)
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def batch_sizes_seen(self) -> dict[float, float]:
        """Cumulative histogram buckets of batch sizes: {upper bound: count <= bound}."""
        out = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == "svlm_batch_size_bucket":
                    out[float(s.labels["le"])] = s.value
        return out


class _Exposition:
    """The collector /metrics serves (:meth:`ServerMetrics.exposition`)."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.exposition()
