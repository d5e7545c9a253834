"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_open = Gauge("svlm_sessions_open", "sessions open now", registry=r)
        self.streams = Gauge("svlm_streams", "streams now, opened or not (each holds an RPC slot)",
                             registry=r)
        self.kv_reserved_bytes = Gauge("svlm_kv_reserved_bytes", "KV-cache memory reserved by sessions",
                                       registry=r)
        self.sessions_total = Counter("svlm_sessions", "sessions opened", registry=r)
        self.rounds_total = Counter("svlm_rounds", "draft blocks answered", ["outcome"], registry=r)
        self.batch_size = Histogram("svlm_batch_size", "blocks per target forward pass",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.accepted_tokens = Histogram("svlm_accepted_tokens", "draft tokens accepted per verified block",
                                         buckets=(0, 1, 2, 3, 4, 5, 6, 8, 12, 16), registry=r)
        self.accepted_per_pass = Histogram("svlm_accepted_tokens_per_pass",
                                           "draft tokens accepted in one forward pass, all sessions together",
                                           buckets=(0, 1, 2, 4, 8, 12, 16, 24, 32, 64), registry=r)
        self.verify_latency = Histogram("svlm_verify_latency_seconds", "time of one batched verification pass",
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                        registry=r)
        self.model_wait = Histogram("svlm_model_wait_seconds", "time a verification pass (or a close, or an "
                                    "autoregressive step) waited for the model, e.g. behind a prefill chunk",
                                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5,
                                             5), registry=r)
        self.queue_wait = Histogram("svlm_queue_wait_seconds", "time a block waited for its batch",
                                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
                                    registry=r)
        self.early_verdicts = Counter("svlm_early_verdicts", "early verdicts sent", registry=r)
        self.refusals = Counter("svlm_refusals", "requests refused", ["code"], registry=r)
        self.tokens_generated = Counter("svlm_autoregressive_tokens", "tokens generated in autoregressive mode",
                                        registry=r)
        self._http = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose /metrics on ``addr:port`` (0 = a free port); returns the port."""
        self._http, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def batch_sizes_seen(self) -> dict[float, float]:
        """Cumulative histogram buckets of batch sizes: {upper bound: count <= bound}."""
        out = {}
        for metric in self.batch_size.collect():
            for s in metric.samples:
                if s.name.endswith("_bucket"):
                    out[float(s.labels["le"])] = s.value
        return out
