"""Prometheus metrics of the gateway (one registry per gateway instance).

The metrics updated per request or per batch (stage batch sizes and latencies,
backend CPU, exits, request latencies, samples) are plain numbers that the event
loop, their only writer, updates without a lock or a label lookup; Prometheus reads
them when /metrics is scraped (`LoopMetrics`, a collector). The others
(requests and errors by outcome) are prometheus_client counters whose children
are looked up once.

The series of one model (samples, exits, request latency, stage batch sizes,
latencies and backend CPU, failed batches, requests cut at shutdown, dropped samples, queue depth)
carry a `model` label: each model's cascade and dataplane write through its
`ModelMetrics` (`GatewayMetrics.model(name)`), whose series are made once. A
loop-updated series written without a model (the front end's latency of
/v1/classify, a cascade made without a model name) leaves the label out, which
Prometheus reads as the empty value. The front ends' request and error counters
(`gateway_requests`, `gateway_errors`) count by protocol, often before a model is
known; the admission and readiness gauges cover every model.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
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
        """The series of these label values (positional, or by name as prometheus_client takes them).
        Labels not given are empty, and left out of the series (`model` comes last, for writers without one)."""
        if by_name:
            values = tuple(by_name.get(name, "") for name in self.labelnames)
        elif len(values) < len(self.labelnames):
            values = (*values, *("",) * (len(self.labelnames) - len(values)))
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = LoopCounter() if self.buckets is None else LoopHistogram(self.buckets)
        return series

    def collect(self) -> Metric:
        """The family's samples; an empty label value is left out (Prometheus reads both alike)."""
        family = Metric(self.name, self.documentation, "counter" if self.buckets is None else "histogram")
        for values, series in self.series.items():
            labels = {name: value for name, value in zip(self.labelnames, values) if value}
            if self.buckets is None:
                family.add_sample(self.name + "_total", labels, series.value)
                continue
            cumulative = 0
            for bound, count in zip((*self.buckets, float("inf")), series.counts):
                cumulative += count
                family.add_sample(self.name + "_bucket", {**labels, "le": floatToGoString(bound)}, cumulative)
            family.add_sample(self.name + "_count", labels, cumulative)
            family.add_sample(self.name + "_sum", labels, series.sum)
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
    """The series of one stage (segment "56" or per-exit model "56-direct") of one model."""

    def __init__(self, metrics: GatewayMetrics, depth: str, model: str = "") -> None:
        self.batch = metrics.stage_batch.labels(depth, model)
        self.latency = metrics.stage_latency.labels(depth, model)
        self.backend_cpu = metrics.backend_cpu.labels(depth, model)

    def observe(self, batch_size: int, seconds: float, cpu_seconds: float) -> None:
        self.batch.observe(batch_size)
        self.latency.observe(seconds)
        self.backend_cpu.inc(cpu_seconds)


class ModelMetrics:
    """The series of one model (its `model` label), each made once and kept: what the model's cascade and
    dataplane write, with no label lookup per request or batch beyond a small dictionary's."""

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.samples = metrics.samples_by_model.labels(model)
        self.shutdown_cut = metrics.shutdown_cut_by_model.labels(model)
        self._latency: dict[str, LoopHistogram] = {}  # by protocol
        self._dropped: dict[str, LoopCounter] = {}  # by reason
        self._backend_errors: dict[str, LoopCounter] = {}  # by stage

    def stage(self, depth: str) -> StageMetrics:
        """`depth` names the stage by its exit depth ("56"), or "56-direct" for a per-exit model."""
        return StageMetrics(self.metrics, depth, self.model)

    def exit(self, depth: int | str) -> LoopCounter:
        """The counter of the samples answered at exit `depth`."""
        return self.metrics.exits.labels(str(depth), self.model)

    def answered(self, protocol: str, samples: int, seconds: float) -> None:
        """One request answered: its samples and latency (the outcome counter is the front end's)."""
        self.samples.inc(samples)
        latency = self._latency.get(protocol)
        if latency is None:
            latency = self._latency[protocol] = self.metrics.request_latency.labels(protocol, self.model)
        latency.observe(seconds)

    def dropped(self, reason: str) -> LoopCounter:
        """The model's dropped-samples counter for `reason`."""
        counter = self._dropped.get(reason)
        if counter is None:
            counter = self._dropped[reason] = self.metrics.dropped_samples.labels(reason, self.model)
        return counter

    def backend_error(self, stage: str) -> LoopCounter:
        counter = self._backend_errors.get(stage)
        if counter is None:
            counter = self._backend_errors[stage] = self.metrics.backend_errors.labels(stage, self.model)
        return counter

    def read_queue_depth(self, read) -> None:
        """The model's `gateway_queue_depth` is `read()` when scraped."""
        self.metrics.queue_depth.labels(self.model).set_function(read)
        self.metrics.queue_depth_models.add(self.model)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gateway_requests", "Inference requests by protocol and outcome",
                                ["protocol", "outcome"], registry=self.registry)
        self.errors = Counter("gateway_errors", "Rejected requests by error type", ["protocol", "error"],
                              registry=self.registry)
        loop = LoopMetrics()
        self.samples_by_model = loop.family("gateway_samples", "Samples (images) answered", ("model",))
        self.exits = loop.family("gateway_exits", "Samples answered per exit depth", ("depth", "model"))
        self.request_latency = loop.family("gateway_request_latency_seconds", "End-to-end request latency",
                                           ("protocol", "model"), LATENCY_BUCKETS)
        self.stage_batch = loop.family("gateway_stage_batch_size", "Batch size of each stage or per-exit model",
                                       ("depth", "model"), BATCH_BUCKETS)
        self.stage_latency = loop.family("gateway_stage_latency_seconds", "Backend time of one stage batch",
                                         ("depth", "model"), LATENCY_BUCKETS)
        self.backend_cpu = loop.family("gateway_backend_cpu_seconds",
                                       "CPU time of the gateway's threads inside backend calls (thread CPU time "
                                       "around each call), by stage; gateway CPU minus this is its own cost",
                                       ("stage", "model"))
        self.dropped_samples = loop.family("gateway_dropped_samples", "Samples taken out of the cascade's "
                                           "queues before their next backend call, by reason (expired: past "
                                           "the request's deadline; cancelled: the client left; failed)",
                                           ("reason", "model"))
        self.backend_errors = loop.family("gateway_backend_errors", "Stage batches that failed (backend call "
                                          "or the dispatch after it), by stage", ("stage", "model"))
        self.shutdown_cut_by_model = loop.family(
            "gateway_shutdown_cut_requests", "Requests answered UNAVAILABLE because the shutdown grace period ended",
            ("model",))
        self.registry.register(loop)
        self.admitted_images = Gauge("gateway_admitted_images", "Images of the requests inside the cascade "
                                     "(what admission control bounds), every model's", registry=self.registry)
        self.backend_ready = Gauge("gateway_backend_ready", "1 when the backend answers its health check",
                                   registry=self.registry)
        self.queue_depth = Gauge("gateway_queue_depth", "Samples queued or running in the cascade, by model",
                                 ["model"], registry=self.registry)
        self.queue_depth_models: set[str] = set()  # the models with a queue depth series
        self._ok: dict[str, Counter] = {}
        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        """The series of model `name`, made once ("": of no model, the label left out where it can be)."""
        found = self._models.get(name)
        if found is None:
            found = self._models[name] = ModelMetrics(self, name)
        return found

    @property
    def samples(self) -> LoopCounter:
        """Samples answered of no model (made when first used: a gateway's series all name their model)."""
        return self.model("").samples

    @property
    def shutdown_cut(self) -> LoopCounter:
        """Requests cut at shutdown of no model (made when first used)."""
        return self.model("").shutdown_cut

    def forget_queue_depth(self, model: str) -> None:
        """A model no longer served: its queue depth series goes."""
        if model in self.queue_depth_models:
            self.queue_depth_models.discard(model)
            self.queue_depth.remove(model)

    def stage(self, depth: str) -> StageMetrics:
        """`depth` names the stage by its exit depth ("56"), or "56-direct" for a per-exit model (of no model)."""
        return StageMetrics(self, depth)

    def answered(self, protocol: str, samples: int, seconds: float) -> None:
        """One request of no model answered (`ModelMetrics.answered` is a model's)."""
        self.model("").answered(protocol, samples, seconds)

    def ok(self, protocol: str) -> None:
        counter = self._ok.get(protocol)
        if counter is None:
            counter = self._ok[protocol] = self.requests.labels(protocol=protocol, outcome="ok")
        counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
