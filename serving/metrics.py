"""Prometheus metrics of the gateway (one registry per gateway instance).

The metrics updated per request or per batch (stage batch sizes and latencies,
backend CPU, exits, request latencies, samples) are plain numbers that the event
loop, their only writer, updates without a lock or a label lookup; Prometheus reads
them when /metrics is scraped (`LoopMetrics`, a collector). The others
(requests and errors by outcome) are prometheus_client counters whose children
are looked up once.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class LoopCounter:
    """One series of a counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram:
    """One series of a histogram: a count per bucket (the last one +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value


class LoopFamily:
    """A labelled metric family of LoopCounter or LoopHistogram series."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 buckets: tuple[float, ...] | None = None) -> None:
        self.name, self.documentation, self.labelnames, self.buckets = name, documentation, labelnames, buckets
        self.series: dict[tuple[str, ...], LoopCounter | LoopHistogram] = {}

    def labels(self, *values: str, **by_name: str):
        """The series of these label values (positional, or by name as prometheus_client takes them)."""
        if by_name:
            values = tuple(by_name[name] for name in self.labelnames)
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = LoopCounter() if self.buckets is None else LoopHistogram(self.buckets)
        return series

    def collect(self):
        if self.buckets is None:
            family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for values, series in self.series.items():
                family.add_metric(list(values), series.value)
            return family
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self.series.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*self.buckets, float("inf")), series.counts):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(values), buckets, series.sum)
        return family


class LoopMetrics(Collector):
    """The loop-updated families, read at scrape time."""

    def __init__(self) -> None:
        self.families: list[LoopFamily] = []

    def family(self, name: str, documentation: str, labelnames: tuple[str, ...],
               buckets: tuple[float, ...] | None = None) -> LoopFamily:
        family = LoopFamily(name, documentation, labelnames, buckets)
        self.families.append(family)
        return family

    def collect(self):
        for family in self.families:
            yield family.collect()


class StageMetrics:
    """The series of one stage (segment "56" or per-exit model "56-direct")."""

    def __init__(self, metrics: GatewayMetrics, depth: str) -> None:
        self.batch = metrics.stage_batch.labels(depth)
        self.latency = metrics.stage_latency.labels(depth)
        self.backend_cpu = metrics.backend_cpu.labels(depth)

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
        loop = LoopMetrics()
        self.samples = loop.family("gateway_samples", "Samples (images) answered", ()).labels()
        self.exits = loop.family("gateway_exits", "Samples answered per exit depth", ("depth",))
        self.request_latency = loop.family("gateway_request_latency_seconds", "End-to-end request latency",
                                           ("protocol",), LATENCY_BUCKETS)
        self.stage_batch = loop.family("gateway_stage_batch_size", "Batch size of each stage or per-exit model",
                                       ("depth",), BATCH_BUCKETS)
        self.stage_latency = loop.family("gateway_stage_latency_seconds", "Backend time of one stage batch",
                                         ("depth",), LATENCY_BUCKETS)
        self.backend_cpu = loop.family("gateway_backend_cpu_seconds",
                                       "CPU time of the gateway's threads inside backend calls (thread CPU time "
                                       "around each call), by stage; gateway CPU minus this is its own cost",
                                       ("stage",))
        self.dropped_samples = loop.family("gateway_dropped_samples", "Samples taken out of the cascade's "
                                           "queues before their next backend call, by reason (expired: past "
                                           "the request's deadline; cancelled: the client left; failed)",
                                           ("reason",))
        self.backend_errors = loop.family("gateway_backend_errors", "Stage batches that failed (backend call "
                                          "or the dispatch after it), by stage", ("stage",))
        self.shutdown_cut = loop.family("gateway_shutdown_cut_requests",
                                        "Requests answered UNAVAILABLE because the shutdown grace period ended",
                                        ()).labels()
        self.registry.register(loop)
        self.admitted_images = Gauge("gateway_admitted_images", "Images of the requests inside the cascade "
                                     "(what admission control bounds)", registry=self.registry)
        self.backend_ready = Gauge("gateway_backend_ready", "1 when the backend answers its health check",
                                   registry=self.registry)
        self.queue_depth = Gauge("gateway_queue_depth", "Samples queued or running in the cascade",
                                 registry=self.registry)
        self._ok: dict[str, Counter] = {}

    def stage(self, depth: str) -> StageMetrics:
        """`depth` names the stage by its exit depth ("56"), or "56-direct" for a per-exit model."""
        return StageMetrics(self, depth)

    def answered(self, protocol: str, samples: int, seconds: float) -> None:
        """One request answered: its samples and latency (the outcome counter is the front end's)."""
        self.samples.inc(samples)
        self.request_latency.labels(protocol).observe(seconds)

    def ok(self, protocol: str) -> None:
        counter = self._ok.get(protocol)
        if counter is None:
            counter = self._ok[protocol] = self.requests.labels(protocol=protocol, outcome="ok")
        counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
