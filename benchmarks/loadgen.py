"""A load generator for KServe v2 servers (perf_analyzer is not on PyPI): closed
loop at a concurrency level, open loop at a Poisson arrival rate, over HTTP or
gRPC with tritonclient's asyncio clients. It reports what perf_analyzer reports
(throughput, p50/p90/p95/p99 latency) plus accuracy, exits taken and, for
latency budgets, the share of requests answered within budget.

Each level is bounded in requests and in seconds. Only loopback addresses.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from common.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass(frozen=True)
class Target:
    protocol: str  # "http" or "grpc"
    url: str  # host:port, loopback only
    model: str
    parameters: dict = field(default_factory=dict)
    fixed_depth: int | None = None  # for models without an exit_depth output (Triton direct)
    budget_ms: float | None = None

    def __post_init__(self) -> None:
        host = self.url.rsplit(":", 1)[0]
        if host not in LOOPBACK:
            raise UserError(f"load is only sent to loopback addresses, not {self.url}")
        if self.protocol not in ("http", "grpc"):
            raise UserError(f"protocol must be http or grpc, not {self.protocol!r}")


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

    async def infer(self, image: np.ndarray, request_id: str) -> tuple[int, int]:
        """(predicted class, exit depth) of one image."""
        tensor = self.module.InferInput("images", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image)
        outputs = [self.module.InferRequestedOutput(name) for name in self.outputs]
        result = await self.client.infer(self.target.model, [tensor], outputs=outputs, request_id=request_id,
                                         parameters=self.target.parameters or None)
        response = result.get_response(as_json=True) if self.target.protocol == "grpc" else result.get_response()
        if response.get("id") != request_id:
            raise RuntimeError(f"response for {request_id} carried id {response.get('id')!r}")
        predicted = int(result.as_numpy("logits")[0].argmax())
        depth = self.target.fixed_depth or int(result.as_numpy("exit_depth")[0])
        return predicted, depth

    async def close(self) -> None:
        await self.client.close()


class _Recorder:
    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.latencies: list[float] = []
        self.correct = 0
        self.exits: Counter = Counter()
        self.errors: list[str] = []
        self.sent = 0
        self.answered: set[str] = set()

    async def call(self, client: _Client, images: np.ndarray, index: int) -> None:
        request_id = f"r{self.sent}"
        self.sent += 1
        position = index % len(images)
        started = time.perf_counter()
        try:
            predicted, depth = await client.infer(images[position:position + 1], request_id)
        except Exception as error:  # a failed request is counted, never retried
            self.errors.append(f"{type(error).__name__}: {error}"[:200])
            return
        self.latencies.append((time.perf_counter() - started) * 1000)
        if request_id in self.answered:
            raise RuntimeError(f"duplicate response for {request_id}")
        self.answered.add(request_id)
        self.correct += int(predicted == self.labels[position])
        self.exits[depth] += 1

    def result(self, mode: str, level: float, duration: float, budget_ms: float | None) -> LevelResult:
        latencies = np.asarray(self.latencies)
        done = len(latencies)
        percentiles = {f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 95, 99)} if done else {}
        percentiles["mean"] = float(latencies.mean()) if done else None
        within = float((latencies <= budget_ms).mean()) if budget_ms and done else None
        return LevelResult(mode, level, self.sent, done, len(self.errors), round(duration, 3),
                           done / duration if duration > 0 else 0.0, percentiles,
                           self.correct / done if done else None, dict(sorted(self.exits.items())), within,
                           self.errors[:3])


async def _warm_up(client: _Client, images: np.ndarray, count: int = 5) -> None:
    """A few uncounted requests first; a failure here shows up in the counted ones."""
    for i in range(count):
        try:
            await client.infer(images[i % len(images): i % len(images) + 1], f"warmup{i}")
        except Exception:
            return


async def closed_loop(target: Target, images: np.ndarray, labels: np.ndarray, concurrency: int,
                      max_requests: int, max_seconds: float) -> LevelResult:
    """`concurrency` clients, each sending its next request when the previous one returns."""
    client = _Client(target)
    recorder = _Recorder(labels)
    try:
        await _warm_up(client, images)
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
    finally:
        await client.close()
    return recorder.result("closed", concurrency, duration, target.budget_ms)


async def open_loop(target: Target, images: np.ndarray, labels: np.ndarray, rate: float, max_requests: int,
                    max_seconds: float, seed: int = 0) -> LevelResult:
    """Requests at Poisson arrivals of `rate` per second, whatever the responses do."""
    client = _Client(target)
    recorder = _Recorder(labels)
    rng = np.random.default_rng(seed)
    try:
        await _warm_up(client, images)
        started = time.perf_counter()
        arrival, tasks = 0.0, []
        for index in range(max_requests):
            arrival += rng.exponential(1.0 / rate)
            if arrival >= max_seconds:
                break
            delay = started + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(recorder.call(client, images, index)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    finally:
        await client.close()
    return recorder.result("open", rate, duration, target.budget_ms)
