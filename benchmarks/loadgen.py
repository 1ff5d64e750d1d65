"""A load generator for KServe v2 servers (perf_analyzer is not on PyPI): closed
loop at a concurrency level, open loop at a Poisson arrival rate, over HTTP or
gRPC with tritonclient's asyncio clients, one image or `Target.batch` images per
request. It reports what perf_analyzer reports (throughput, p50/p90/p95/p99
latency) plus accuracy, exits taken and, for latency budgets, the share of
requests answered within budget; given a meter (benchmarks.cpu.CpuMeter), the CPU
each process spent in the measured window (warm-up excluded).

Open-loop latency runs from each request's scheduled arrival, so a generator that
falls behind its schedule shows up as latency instead of hiding it. Each level is
bounded in requests and in seconds. Only loopback addresses.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from common.errors import UserError
from serving.kserve_grpc_client import set_parameter

LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass(frozen=True)
class Target:
    protocol: str  # "http" or "grpc"
    url: str  # host:port, loopback only
    model: str
    parameters: dict = field(default_factory=dict)
    fixed_depth: int | None = None  # for models without an exit_depth output (Triton direct)
    budget_ms: float | None = None
    batch: int = 1  # images per request
    input_name: str = "images"  # of the FP32 normalised images (the cascade model's: normalised_images)

    def __post_init__(self) -> None:
        host = self.url.rsplit(":", 1)[0]
        if host not in LOOPBACK:
            raise UserError(f"load is only sent to loopback addresses, not {self.url}")
        if self.protocol not in ("http", "grpc"):
            raise UserError(f"protocol must be http or grpc, not {self.protocol!r}")
        if self.batch < 1:
            raise UserError(f"batch must be at least 1, not {self.batch}")


class Meter(Protocol):
    """What the load generator calls around a measured window (benchmarks.cpu.CpuMeter)."""

    def start(self) -> None: ...

    def stop(self, requests: int) -> dict: ...


@dataclass
class LevelResult:
    mode: str  # "closed" (level = concurrency) or "open" (level = requests per second)
    level: float
    sent: int
    completed: int
    errors: int
    duration_s: float
    throughput: float
    latency_ms: dict  # p50, p90, p95, p99, mean
    accuracy: float | None
    exits: dict  # depth -> count
    within_budget: float | None
    error_examples: list = field(default_factory=list)
    images_per_request: int = 1
    cpu: dict | None = None  # the meter's record of the measured window

    def as_dict(self) -> dict:
        return asdict(self)


class _Client:
    """One tritonclient asyncio client and the request it sends."""

    def __init__(self, target: Target) -> None:
        if target.protocol == "grpc":
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        self.module, self.target = module, target
        self.client = module.InferenceServerClient(target.url)
        self.outputs = ["logits"] if target.fixed_depth is not None else ["logits", "exit_depth"]

    async def infer(self, images: np.ndarray, request_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class, exit depth) of each image of one request."""
        tensor = self.module.InferInput(self.target.input_name, list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        outputs = [self.module.InferRequestedOutput(name) for name in self.outputs]
        result = await self.client.infer(self.target.model, [tensor], outputs=outputs, request_id=request_id,
                                         parameters=self.target.parameters or None)
        response = result.get_response(as_json=True) if self.target.protocol == "grpc" else result.get_response()
        if response.get("id") != request_id:
            raise RuntimeError(f"response for {request_id} carried id {response.get('id')!r}")
        predicted = result.as_numpy("logits").reshape(len(images), -1).argmax(axis=1)
        if self.target.fixed_depth is not None:
            return predicted, np.full(len(images), self.target.fixed_depth)
        return predicted, result.as_numpy("exit_depth").reshape(-1)

    async def close(self) -> None:
        await self.client.close()


class Sender(Protocol):
    """What sends one request: `_Client`, or a fake in tests."""

    async def infer(self, images: np.ndarray, request_id: str) -> tuple[np.ndarray, np.ndarray]: ...

    async def close(self) -> None: ...


def _request_images(images: np.ndarray, index: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The images of request `index` (`batch` consecutive ones, wrapping around) and their positions."""
    positions = (np.arange(batch) + index * batch) % len(images)
    return images[positions], positions


class _Recorder:
    def __init__(self, labels: np.ndarray, batch: int = 1, clock: Callable[[], float] = time.perf_counter) -> None:
        self.labels, self.batch, self.clock = labels, batch, clock
        self.latencies: list[float] = []
        self.correct = 0
        self.images_answered = 0
        self.exits: Counter = Counter()
        self.errors: list[str] = []
        self.sent = 0
        self.answered: set[str] = set()

    async def call(self, client: Sender, images: np.ndarray, index: int, origin: float | None = None) -> None:
        """Send request `index`; its latency runs from `origin` (its scheduled arrival) if given, else from now."""
        request_id = f"r{self.sent}"
        self.sent += 1
        batch, positions = _request_images(images, index, self.batch)
        started = self.clock() if origin is None else origin
        try:
            predicted, depths = await client.infer(batch, request_id)
        except Exception as error:  # a failed request is counted, never retried
            self.errors.append(f"{type(error).__name__}: {error}"[:200])
            return
        self.latencies.append((self.clock() - started) * 1000)
        if request_id in self.answered:
            raise RuntimeError(f"duplicate response for {request_id}")
        self.answered.add(request_id)
        self.correct += int((np.asarray(predicted) == self.labels[positions]).sum())
        self.images_answered += len(positions)
        self.exits.update(int(depth) for depth in depths)

    def result(self, mode: str, level: float, duration: float, budget_ms: float | None) -> LevelResult:
        latencies = np.asarray(self.latencies)
        done = len(latencies)
        percentiles = {f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 95, 99)} if done else {}
        percentiles["mean"] = float(latencies.mean()) if done else None
        within = float((latencies <= budget_ms).mean()) if budget_ms and done else None
        return LevelResult(mode, level, self.sent, done, len(self.errors), round(duration, 3),
                           done / duration if duration > 0 else 0.0, percentiles,
                           self.correct / self.images_answered if done else None, dict(sorted(self.exits.items())),
                           within, self.errors[:3], self.batch)


async def _warm_up(client: Sender, images: np.ndarray, batch: int, count: int = 5) -> None:
    """A few uncounted requests first; a failure here shows up in the counted ones."""
    for i in range(count):
        try:
            await client.infer(_request_images(images, i, batch)[0], f"warmup{i}")
        except Exception:
            return


def _measured(result: LevelResult, meter: Meter | None) -> LevelResult:
    if meter is not None:
        result.cpu = meter.stop(result.sent)
    return result


async def closed_loop(target: Target, images: np.ndarray, labels: np.ndarray, concurrency: int,
                      max_requests: int, max_seconds: float, meter: Meter | None = None) -> LevelResult:
    """`concurrency` clients, each sending its next request when the previous one returns."""
    client = _Client(target)
    recorder = _Recorder(labels, target.batch)
    try:
        await _warm_up(client, images, target.batch)
        if meter is not None:
            meter.start()
        deadline = time.perf_counter() + max_seconds
        counter = iter(range(max_requests))

        async def worker() -> None:
            for index in counter:
                if time.perf_counter() >= deadline:
                    return
                await recorder.call(client, images, index)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - started
        result = _measured(recorder.result("closed", concurrency, duration, target.budget_ms), meter)
    finally:
        await client.close()
    return result


async def open_loop(target: Target, images: np.ndarray, labels: np.ndarray, rate: float, max_requests: int,
                    max_seconds: float, seed: int = 0, meter: Meter | None = None, client: Sender | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> LevelResult:
    """Requests at Poisson arrivals of `rate` per second, whatever the responses do; each request's
    latency runs from its scheduled arrival. `client` and `clock` are for tests (a fake server, a fake clock)."""
    client = client or _Client(target)
    recorder = _Recorder(labels, target.batch, clock)
    rng = np.random.default_rng(seed)
    try:
        await _warm_up(client, images, target.batch)
        if meter is not None:
            meter.start()
        started = clock()
        arrival, tasks = 0.0, []
        for index in range(max_requests):
            arrival += rng.exponential(1.0 / rate)
            if arrival >= max_seconds:
                break
            delay = started + arrival - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(recorder.call(client, images, index, origin=started + arrival)))
        await asyncio.gather(*tasks)
        duration = clock() - started
        result = _measured(recorder.result("open", rate, duration, target.budget_ms), meter)
    finally:
        await client.close()
    return result


# -- a cheap open-loop generator (overload) -------------------------------------
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer_messages(model: str, images: np.ndarray, count: int, parameters: dict | None = None) -> list[bytes]:
    """`count` serialized ModelInferRequest messages of one image each (raw FP32 contents), built once:
    sending one is then a bytes hand-off to grpc, with no tritonclient object, copy or serialization per call."""
    from tritonclient.grpc import service_pb2

    messages = []
    for index in range(count):
        image = np.ascontiguousarray(images[index % len(images)][None], dtype=np.float32)
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name="images", datatype="FP32", shape=list(image.shape))
        request.raw_input_contents.append(image.tobytes())
        for name, value in (parameters or {}).items():
            set_parameter(request.parameters[name], value)
        messages.append(request.SerializeToString())
    return messages


@dataclass
class RawOpenLoop:
    """What `raw_open_loop` measured: each call's outcome ("ok" or the gRPC code name) and latency from
    its scheduled arrival, and how far the sender itself fell behind its schedule."""

    rate: float  # requests per second scheduled
    seconds: float
    scheduled: int
    sent: int
    outcomes: list[str]
    latency_ms: list[float]  # from each call's scheduled arrival to its answer
    service_ms: list[float]  # from each call's actual send to its answer
    send_lag_ms: list[float]  # actual send - scheduled arrival, per call
    send_window_s: float  # from the first scheduled arrival to the last call sent
    cpu: dict | None = None  # a meter's record of the window, when the caller measured one
    examples: dict = field(default_factory=dict)  # gRPC code -> the details of its first call

    @property
    def achieved_rps(self) -> float:
        """Calls sent per second over the schedule (what the generator really offered)."""
        return self.sent / max(self.seconds, self.send_window_s)


async def raw_open_loop(url: str, messages: list[bytes], rate: float, seconds: float, channels: int = 4,
                        seed: int = 0, timeout_s: float | None = None) -> RawOpenLoop:
    """Poisson arrivals at `rate` for `seconds` of pre-built ModelInfer messages over `channels` gRPC
    channels (bytes in, bytes out: no (de)serialization here), whatever the answers do. Arrivals that
    fall due while the sender is busy go out at once, late (their lag is recorded): the latency of every
    call runs from its scheduled arrival, so a generator that cannot keep up shows it."""
    import grpc

    if url.rsplit(":", 1)[0] not in LOOPBACK:
        raise UserError(f"load is only sent to loopback addresses, not {url}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds * 1.2) + 16))
    arrivals = arrivals[arrivals < seconds].tolist()
    opened = [grpc.aio.insecure_channel(url) for _ in range(channels)]
    stubs = [channel.unary_unary(MODEL_INFER) for channel in opened]  # no serializers: bytes as they are
    outcomes: list[str] = []
    latency_ms: list[float] = []
    service_ms: list[float] = []
    lags: list[float] = []
    examples: dict[str, str] = {}
    clock = time.perf_counter
    ok_code = "ok"

    async def one(stub, message: bytes, scheduled: float, sent: float) -> None:
        try:
            await stub(message, timeout=timeout_s)
            outcome = ok_code
        except grpc.aio.AioRpcError as error:
            outcome = error.code().name
            if outcome not in examples:
                examples[outcome] = str(error.details())[:200]
        done = clock()
        outcomes.append(outcome)
        latency_ms.append((done - scheduled) * 1000)
        service_ms.append((done - sent) * 1000)

    try:
        for stub in stubs:  # connected before the clock starts
            await stub(messages[0])
        tasks = set()
        started = clock()
        count, last_sent = len(messages), started
        for index, arrival in enumerate(arrivals):
            scheduled = started + arrival
            now = clock()
            if scheduled > now:
                await asyncio.sleep(scheduled - now)
                now = clock()
            lags.append((now - scheduled) * 1000)
            task = asyncio.ensure_future(one(stubs[index % channels], messages[index % count], scheduled, now))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            last_sent = now
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for channel in opened:
            await channel.close()
    return RawOpenLoop(rate, seconds, len(arrivals), len(lags), outcomes, latency_ms, service_ms, lags,
                       last_sent - started, examples=examples)
