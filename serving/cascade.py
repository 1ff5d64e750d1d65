"""The cascade: samples run stage by stage; those that continue, from all concurrent
requests, are re-batched at every stage. Requests for one fixed exit (policies
`fixed` and `full`) skip the staging and run that exit's per-exit model in one
call, batched the same way, when the backend has per-exit models.

Each lane (a `Lane`: one segment, or one exit's per-exit model) has a queue and
one worker task. A worker takes everything queued (up to the maximum batch) and
runs it at once, so a lone request never waits; under load, work piles up while
a batch runs and the next batch is larger. When samples
are still in earlier stages it may wait up to `max_wait_ms` for them to arrive.
Backend calls run on a small thread pool; decisions and bookkeeping run on the
event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serving.backends import StageBackend
from serving.errors import GatewayError, Unavailable
from serving.metrics import GatewayMetrics
from serving.policy import ExitPlan, RequestOptions, confidence_scores, should_stop, softmax


@dataclass(frozen=True)
class CascadeResult:
    logits: np.ndarray  # (N, classes) of the exit each sample left at
    exit_index: np.ndarray  # (N,) position of that exit in the plan
    confidence: np.ndarray  # (N,) the request's score at that exit


@dataclass
class _Request:
    options: RequestOptions
    size: int
    started: float
    future: asyncio.Future
    logits: np.ndarray | None = None
    exit_index: np.ndarray | None = None
    confidence: np.ndarray | None = None
    remaining: int = 0

    def __post_init__(self) -> None:
        self.remaining = self.size
        self.exit_index = np.zeros(self.size, dtype=np.int32)
        self.confidence = np.zeros(self.size, dtype=np.float32)


@dataclass
class _Group:
    """Samples of one request waiting at one stage."""

    request: _Request
    samples: np.ndarray  # indices into the request
    inputs: np.ndarray
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Lane:
    """One queue of the cascade, with its worker: the segment that ends at exit
    `position` of the plan, or (direct) that exit's per-exit model, which runs the
    whole prefix on the images in one call."""

    position: int  # of the exit in the plan
    direct: bool = False


@dataclass(frozen=True)
class CascadeSettings:
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    workers: int = 2
    budget_margin: float = 1.1  # predicted stage time is multiplied by this for the budget policy


class Cascade:
    def __init__(self, backend: StageBackend, plan: ExitPlan, settings: CascadeSettings,
                 metrics: GatewayMetrics | None = None, profiled_ms: list[float | None] | None = None) -> None:
        self.backend, self.plan, self.settings, self.metrics = backend, plan, settings, metrics
        stages = len(plan.depths)
        self.stages = stages
        self.direct = bool(getattr(backend, "has_exit_models", False))
        self.segment_lanes = [Lane(position) for position in range(stages)]
        self.direct_lanes = [Lane(position, direct=True) for position in range(stages)] if self.direct else []
        self.lanes = [*self.segment_lanes, *self.direct_lanes]
        self.queues: dict[Lane, deque[_Group]] = {lane: deque() for lane in self.lanes}
        self.in_lane: dict[Lane, int] = dict.fromkeys(self.lanes, 0)  # samples queued at or running in each
        # Moving average of a group's time at each stage (queueing + run), in ms.
        self.stage_ms: list[float | None] = list(profiled_ms or [None] * stages)
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="stage")
        self._wakeups: dict[Lane, asyncio.Event] = {}
        self._workers: list[asyncio.Task] = []
        self._active = 0
        self._idle: asyncio.Event | None = None
        self.accepting = False

    async def start(self, warmup_input: np.ndarray | None = None) -> None:
        self._wakeups = {lane: asyncio.Event() for lane in self.lanes}
        self._slots = asyncio.Semaphore(self.settings.workers)
        self._running: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        if warmup_input is not None:
            await self._warm_up(warmup_input)
        self._workers = [asyncio.create_task(self._lane_worker(lane)) for lane in self.lanes]
        self.accepting = True

    async def _warm_up(self, sample: np.ndarray) -> None:
        """One batch-1 call per stage: first calls are slow, and it seeds the estimates."""
        loop = asyncio.get_running_loop()
        inputs = sample
        for stage in range(self.stages):
            started = time.monotonic()
            _, features = await loop.run_in_executor(self.executor, self.backend.run, stage, inputs)
            measured = (time.monotonic() - started) * 1000
            if self.stage_ms[stage] is None:
                self.stage_ms[stage] = measured
            inputs = features
        if self.direct:
            for index in range(self.stages):
                await loop.run_in_executor(self.executor, self.backend.run_exit, index, sample)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `timeout`), then stop workers."""
        self.accepting = False
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        for task in [*self._workers, *self._running]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._running, return_exceptions=True)
        self.executor.shutdown(wait=True)
        self.backend.close()

    @property
    def queue_depth(self) -> int:
        return sum(self.in_lane.values())

    async def infer(self, inputs: np.ndarray, options: RequestOptions) -> CascadeResult:
        """Run a batch of images (already normalised) through the cascade."""
        if not self.accepting:
            raise Unavailable("the gateway is shutting down")
        loop = asyncio.get_running_loop()
        request = _Request(options, len(inputs), time.monotonic(), loop.create_future())
        self._active += 1
        self._idle.clear()
        lane = self.segment_lanes[0]
        if self.direct and options.policy in ("fixed", "full"):
            depth = options.exit_depth if options.policy == "fixed" else self.plan.depths[-1]
            lane = self.direct_lanes[self.plan.depths.index(depth)]
        try:
            for start in range(0, len(inputs), self.settings.max_batch_size):
                stop = min(start + self.settings.max_batch_size, len(inputs))
                self._enqueue(lane, _Group(request, np.arange(start, stop), inputs[start:stop]))
            await request.future
            return CascadeResult(request.logits, request.exit_index, request.confidence)
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def _enqueue(self, lane: Lane, group: _Group) -> None:
        self.queues[lane].append(group)
        self.in_lane[lane] += len(group.samples)
        if self.metrics:
            self.metrics.queue_depth.set(self.queue_depth)
        self._wakeups[lane].set()

    def _take_batch(self, lane: Lane) -> list[_Group]:
        queue, taken, size = self.queues[lane], [], 0
        while queue and size + len(queue[0].samples) <= self.settings.max_batch_size:
            group = queue.popleft()
            taken.append(group)
            size += len(group.samples)
        if not taken and queue:  # never happens for groups split at entry, but be safe
            taken.append(queue.popleft())
        return taken

    def _queued(self, lane: Lane) -> int:
        return sum(len(group.samples) for group in self.queues[lane])

    def _run_lane(self, lane: Lane, batch: np.ndarray):
        if lane.direct:
            return self.backend.run_exit(lane.position, batch), None
        return self.backend.run(lane.position, batch)

    async def _lane_worker(self, lane: Lane) -> None:
        """Worker of one lane.

        It takes a backend slot (at most `workers` calls run at once, over all lanes)
        before it takes its batch, so work queues up while every slot is busy, and a
        lane under load can have several batches running on several cores.
        """
        wakeup = self._wakeups[lane]
        while True:
            while not self.queues[lane]:
                wakeup.clear()
                await wakeup.wait()
            await self._maybe_wait_for_more(lane)
            await self._slots.acquire()
            groups = self._take_batch(lane)
            if not groups:  # another batch took them meanwhile
                self._slots.release()
                continue
            if not self.queues[lane]:
                wakeup.clear()
            task = asyncio.create_task(self._run_batch(lane, groups))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, lane: Lane, groups: list[_Group]) -> None:
        loop = asyncio.get_running_loop()
        batch = groups[0].inputs if len(groups) == 1 else np.concatenate([g.inputs for g in groups])
        started = time.monotonic()
        try:
            logits, features = await loop.run_in_executor(self.executor, self._run_lane, lane, batch)
        except Exception as error:  # a failing backend fails this batch's requests, not the worker
            failure = error if isinstance(error, GatewayError) else Unavailable(f"backend error: {error}")
            for group in groups:
                self.in_lane[lane] -= len(group.samples)
                if not group.request.future.done():
                    group.request.future.set_exception(failure)
            return
        finally:
            self._slots.release()
        if self.metrics:
            depth = self.plan.depths[lane.position]
            self.metrics.observe_stage(f"{depth}-direct" if lane.direct else str(depth), len(batch),
                                       time.monotonic() - started)
        if lane.direct:
            self._dispatch_direct(lane, groups, logits)
        else:
            self._dispatch(lane, groups, logits, features)

    def _upstream(self, lane: Lane) -> int:
        """Samples queued at or running in the segments before `lane`'s."""
        return sum(self.in_lane[earlier] for earlier in self.segment_lanes[:lane.position])

    async def _maybe_wait_for_more(self, lane: Lane) -> None:
        """Wait (bounded) for samples still in earlier segments, if the batch is not full."""
        max_wait = self.settings.max_wait_ms / 1000
        if max_wait <= 0 or lane.direct or lane.position == 0:
            return
        deadline = time.monotonic() + max_wait
        while (self._queued(lane) < self.settings.max_batch_size and self._upstream(lane) > 0
               and (remaining := deadline - time.monotonic()) > 0):
            self._wakeups[lane].clear()
            try:
                await asyncio.wait_for(self._wakeups[lane].wait(), remaining)
            except asyncio.TimeoutError:
                break

    def _dispatch(self, lane: Lane, groups: list[_Group], logits: np.ndarray, features: np.ndarray | None) -> None:
        """Each sample of a segment lane leaves at its exit or continues in the next segment."""
        stage = lane.position
        now = time.monotonic()
        probabilities = softmax(logits.astype(np.float64))
        last = stage == self.stages - 1
        offset = 0
        for group in groups:
            count = len(group.samples)
            rows = slice(offset, offset + count)
            offset += count
            self.in_lane[lane] -= count
            self._record_stage_time(stage, (now - group.enqueued) * 1000)
            request = group.request
            if request.future.done():  # cancelled by the client, or failed
                continue
            scores = confidence_scores(probabilities[rows], request.options.score)
            next_ms = None if last else self._predicted_ms(stage + 1)
            stop = should_stop(stage, scores, request.options, self.plan,
                               elapsed_ms=(now - request.started) * 1000, next_stage_ms=next_ms)
            if request.logits is None:
                request.logits = np.zeros((request.size, logits.shape[1]), dtype=np.float32)
            done = group.samples[stop]
            request.logits[done] = logits[rows][stop]
            request.exit_index[done] = stage
            request.confidence[done] = scores[stop]
            request.remaining -= len(done)
            if self.metrics and len(done):
                self.metrics.exits.labels(depth=str(self.plan.depths[stage])).inc(len(done))
            if not stop.all():
                self._enqueue(self.segment_lanes[stage + 1],
                              _Group(request, group.samples[~stop], features[rows][~stop]))
            elif request.remaining == 0:
                request.future.set_result(None)
        if self.metrics:
            self.metrics.queue_depth.set(self.queue_depth)

    def _dispatch_direct(self, lane: Lane, groups: list[_Group], logits: np.ndarray) -> None:
        """Every sample of a direct lane leaves at that lane's exit."""
        index = lane.position
        probabilities = softmax(logits.astype(np.float64))
        offset = 0
        for group in groups:
            rows = slice(offset, offset + len(group.samples))
            offset += len(group.samples)
            self.in_lane[lane] -= len(group.samples)
            request = group.request
            if request.future.done():
                continue
            if request.logits is None:
                request.logits = np.zeros((request.size, logits.shape[1]), dtype=np.float32)
            request.logits[group.samples] = logits[rows]
            request.exit_index[group.samples] = index
            request.confidence[group.samples] = confidence_scores(probabilities[rows], request.options.score)
            request.remaining -= len(group.samples)
            if self.metrics:
                self.metrics.exits.labels(depth=str(self.plan.depths[index])).inc(len(group.samples))
            if request.remaining == 0:
                request.future.set_result(None)
        if self.metrics:
            self.metrics.queue_depth.set(self.queue_depth)

    def _record_stage_time(self, stage: int, milliseconds: float, alpha: float = 0.1) -> None:
        previous = self.stage_ms[stage]
        self.stage_ms[stage] = milliseconds if previous is None else (1 - alpha) * previous + alpha * milliseconds

    def _predicted_ms(self, stage: int) -> float | None:
        estimate = self.stage_ms[stage]
        return None if estimate is None else estimate * self.settings.budget_margin
