"""Prometheus metrics of the gateway (one registry per gateway instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


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
        self.queue_depth = Gauge("gateway_queue_depth", "Samples queued or running in the cascade",
                                 registry=self.registry)

    def observe_stage(self, depth: str, batch_size: int, seconds: float) -> None:
        """`depth` names the stage by its exit depth ("56"), or "56-direct" for a per-exit model."""
        self.stage_batch.labels(depth=depth).observe(batch_size)
        self.stage_latency.labels(depth=depth).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
