"""Prometheus metrics of the gateway (one registry per gateway instance).

Labelled children are looked up once (`.labels(...)` costs a lock and a dict
lookup) and kept: the hot path calls `inc` and `observe` on cached children.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class StageMetrics:
    """The children of one stage (segment "56" or per-exit model "56-direct")."""

    def __init__(self, metrics: GatewayMetrics, depth: str) -> None:
        self.batch = metrics.stage_batch.labels(depth=depth)
        self.latency = metrics.stage_latency.labels(depth=depth)
        self.backend_cpu = metrics.backend_cpu.labels(stage=depth)

    def observe(self, batch_size: int, seconds: float, cpu_seconds: float) -> None:
        self.batch.observe(batch_size)
        self.latency.observe(seconds)
        self.backend_cpu.inc(cpu_seconds)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gateway_requests", "Inference requests by protocol and outcome",
                                ["protocol", "outcome"], registry=self.registry)
        self.errors = Counter("gateway_errors", "Rejected requests by error type", ["protocol", "error"],
                              registry=self.registry)
        self.samples = Counter("gateway_samples", "Samples (images) answered", registry=self.registry)
        self.exits = Counter("gateway_exits", "Samples answered per exit depth", ["depth"], registry=self.registry)
        self.request_latency = Histogram("gateway_request_latency_seconds", "End-to-end request latency",
                                         ["protocol"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage_batch = Histogram("gateway_stage_batch_size", "Batch size of each stage or per-exit model",
                                     ["depth"],
                                     buckets=BATCH_BUCKETS, registry=self.registry)
        self.stage_latency = Histogram("gateway_stage_latency_seconds", "Backend time of one stage batch",
                                       ["depth"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.backend_cpu = Counter("gateway_backend_cpu_seconds",
                                   "CPU time of the gateway's threads inside backend calls (thread CPU time "
                                   "around each call), by stage; gateway CPU minus this is its own cost",
                                   ["stage"], registry=self.registry)
        self.queue_depth = Gauge("gateway_queue_depth", "Samples queued or running in the cascade",
                                 registry=self.registry)
        self._ok: dict[str, Counter] = {}
        self._latency: dict[str, Histogram] = {}

    def stage(self, depth: str) -> StageMetrics:
        """`depth` names the stage by its exit depth ("56"), or "56-direct" for a per-exit model."""
        return StageMetrics(self, depth)

    def observe_stage(self, depth: str, batch_size: int, seconds: float, cpu_seconds: float = 0.0) -> None:
        self.stage(depth).observe(batch_size, seconds, cpu_seconds)

    def answered(self, protocol: str, samples: int, seconds: float) -> None:
        """One request answered: its samples and latency (the outcome counter is the front end's)."""
        latency = self._latency.get(protocol)
        if latency is None:
            latency = self._latency[protocol] = self.request_latency.labels(protocol=protocol)
        self.samples.inc(samples)
        latency.observe(seconds)

    def ok(self, protocol: str) -> None:
        counter = self._ok.get(protocol)
        if counter is None:
            counter = self._ok[protocol] = self.requests.labels(protocol=protocol, outcome="ok")
        counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
