"""The cascade: samples run stage by stage; those that continue, from all concurrent
requests, are re-batched at every stage. Requests for one fixed exit (policies
`fixed` and `full`) skip the staging and run that exit's per-exit model in one
call, batched the same way, when the backend has per-exit models.

Each lane (a `Lane`: one segment, or one exit's per-exit model) has a queue and
one worker task. A worker takes everything queued (up to the maximum batch) and
runs it at once, so a lone request never waits; under load, work piles up while
a batch runs and the next batch is larger. When samples
are still in earlier stages it may wait up to `max_wait_ms` for them to arrive.
Backend calls run on `workers` threads; decisions and bookkeeping run on the
event loop.

The per-request and per-stage cost is kept small (issue 19): one hand-off to a
backend thread per batch (a queue put) and one call back to the event loop per
batch (`call_soon_threadsafe`), no task or future per batch; one float32 softmax
per batch; cached metric children; a request answered by one batch keeps that
batch's rows instead of copying them into arrays of its own.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
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


@dataclass(slots=True)
class _Request:
    options: RequestOptions
    size: int
    started: float
    future: asyncio.Future
    remaining: int = 0
    # (samples, logits, exit position, confidence) of the samples answered so far, per batch.
    parts: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.remaining = self.size

    def answer(self, samples: np.ndarray, logits: np.ndarray, index: int, confidence: np.ndarray) -> None:
        self.parts.append((samples, logits, index, confidence))
        self.remaining -= len(samples)
        if self.remaining == 0:
            self.future.set_result(None)

    def result(self) -> CascadeResult:
        if len(self.parts) == 1:  # every sample in one batch: its rows, in order
            _, logits, index, confidence = self.parts[0]
            return CascadeResult(logits, np.full(self.size, index, dtype=np.int32),
                                 confidence.astype(np.float32, copy=False))
        logits = np.zeros((self.size, self.parts[0][1].shape[1]), dtype=np.float32)
        exit_index = np.zeros(self.size, dtype=np.int32)
        confidences = np.zeros(self.size, dtype=np.float32)
        for samples, rows, index, confidence in self.parts:
            logits[samples] = rows
            exit_index[samples] = index
            confidences[samples] = confidence
        return CascadeResult(logits, exit_index, confidences)


@dataclass(slots=True)
class _Group:
    """Samples of one request waiting at one stage."""

    request: _Request
    samples: np.ndarray  # indices into the request
    inputs: np.ndarray
    enqueued: float = field(default_factory=time.monotonic)


class _BatchScores:
    """Confidence scores of a batch's rows, computed once per score kind when first needed."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits
        self.probabilities: np.ndarray | None = None
        self.by_score: dict[str, np.ndarray] = {}

    def __call__(self, score: str) -> np.ndarray:
        scores = self.by_score.get(score)
        if scores is None:
            if self.probabilities is None:
                self.probabilities = softmax(self.logits.astype(np.float32, copy=False))
            scores = self.by_score[score] = confidence_scores(self.probabilities, score)
        return scores


@dataclass(frozen=True, eq=False)
class Lane:
    """One queue of the cascade, with its worker: the segment that ends at exit
    `position` of the plan, or (direct) that exit's per-exit model, which runs the
    whole prefix on the images in one call. The cascade makes each lane once, so
    lanes compare and hash by identity (a cheap dictionary key on the hot path)."""

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
        self._direct_lane_of = {depth: lane for depth, lane in zip(plan.depths, self.direct_lanes)}
        if metrics:
            self._stage_metrics = {lane: metrics.stage(f"{plan.depths[lane.position]}-direct" if lane.direct
                                                       else str(plan.depths[lane.position]))
                                   for lane in self.lanes}
            self._exit_counters = [metrics.exits.labels(depth=str(depth)) for depth in plan.depths]
            metrics.queue_depth.set_function(lambda: self.queue_depth)  # read when scraped
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # batches for the backend threads; None stops one
        self._threads: list[threading.Thread] = []
        self._wakeups: dict[Lane, asyncio.Event] = {}
        self._workers: list[asyncio.Task] = []
        self._active = 0
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.accepting = False

    async def start(self, warmup_input: np.ndarray | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeups = {lane: asyncio.Event() for lane in self.lanes}
        self._slots = asyncio.Semaphore(self.settings.workers)
        self._idle = asyncio.Event()
        self._idle.set()
        self._threads = [threading.Thread(target=self._backend_thread, name=f"stage_{k}", daemon=True)
                         for k in range(self.settings.workers)]
        for thread in self._threads:
            thread.start()
        if warmup_input is not None:
            await self._warm_up(warmup_input)
        self._workers = [asyncio.create_task(self._lane_worker(lane)) for lane in self.lanes]
        self.accepting = True

    async def _warm_up(self, sample: np.ndarray) -> None:
        """One batch-1 call per stage: first calls are slow, and it seeds the estimates."""
        inputs = sample
        for stage in range(self.stages):
            started = time.monotonic()
            _, features = await asyncio.to_thread(self.backend.run, stage, inputs)
            measured = (time.monotonic() - started) * 1000
            if self.stage_ms[stage] is None:
                self.stage_ms[stage] = measured
            inputs = features
        if self.direct:
            for index in range(self.stages):
                await asyncio.to_thread(self.backend.run_exit, index, sample)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `timeout`), then stop workers."""
        self.accepting = False
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for _ in self._threads:
            self._jobs.put(None)
        await asyncio.to_thread(lambda: [thread.join() for thread in self._threads])
        self.backend.close()

    @property
    def queue_depth(self) -> int:
        return sum(self.in_lane.values())

    async def infer(self, inputs: np.ndarray, options: RequestOptions) -> CascadeResult:
        """Run a batch of images (already normalised) through the cascade."""
        if not self.accepting:
            raise Unavailable("the gateway is shutting down")
        request = _Request(options, len(inputs), time.monotonic(), self._loop.create_future())
        self._active += 1
        self._idle.clear()
        lane = self.segment_lanes[0]
        if self.direct and options.policy in ("fixed", "full"):
            lane = self._direct_lane_of[options.exit_depth if options.policy == "fixed" else self.plan.depths[-1]]
        try:
            maximum = self.settings.max_batch_size
            if len(inputs) <= maximum:
                self._enqueue(lane, _Group(request, np.arange(len(inputs)), inputs))
            else:
                for start in range(0, len(inputs), maximum):
                    stop = min(start + maximum, len(inputs))
                    self._enqueue(lane, _Group(request, np.arange(start, stop), inputs[start:stop]))
            await request.future
            return request.result()
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def _enqueue(self, lane: Lane, group: _Group) -> None:
        self.queues[lane].append(group)
        self.in_lane[lane] += len(group.samples)
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

    async def _lane_worker(self, lane: Lane) -> None:
        """Worker of one lane.

        It takes a backend slot (at most `workers` calls run at once, over all lanes)
        before it takes its batch, so work queues up while every slot is busy, and a
        lane under load can have several batches running on several cores.
        """
        wakeup, queued = self._wakeups[lane], self.queues[lane]
        while True:
            while not queued:
                wakeup.clear()
                await wakeup.wait()
            await self._maybe_wait_for_more(lane)
            await self._slots.acquire()
            groups = self._take_batch(lane)
            if not groups:  # another batch took them meanwhile
                self._slots.release()
                continue
            if not queued:
                wakeup.clear()
            batch = groups[0].inputs if len(groups) == 1 else np.concatenate([g.inputs for g in groups])
            self._jobs.put((lane, groups, batch, time.monotonic()))

    def _backend_thread(self) -> None:
        """A backend thread: runs batches, hands each outcome back to the event loop in one call."""
        while (job := self._jobs.get()) is not None:
            lane, groups, batch, started = job
            cpu = time.thread_time()
            try:
                if lane.direct:
                    outcome = self.backend.run_exit(lane.position, batch), None
                else:
                    outcome = self.backend.run(lane.position, batch)
            except Exception as error:  # a failing backend fails this batch's requests, not the worker
                outcome = error
            cpu = time.thread_time() - cpu
            try:
                self._loop.call_soon_threadsafe(self._finish_batch, lane, groups, len(batch), outcome, started, cpu)
            except RuntimeError:  # the event loop is closed: nobody waits for this batch
                pass

    def _finish_batch(self, lane: Lane, groups: list[_Group], size: int, outcome, started: float,
                      cpu_seconds: float) -> None:
        """On the event loop: a backend call's outcome to its requests."""
        self._slots.release()
        self.in_lane[lane] -= size
        if self.metrics:
            self._stage_metrics[lane].observe(size, time.monotonic() - started, cpu_seconds)
        try:
            if isinstance(outcome, Exception):
                raise outcome
            logits, features = outcome
            if lane.direct:
                self._dispatch_direct(lane, groups, logits)
            else:
                self._dispatch(lane, groups, logits, features)
        except Exception as error:
            failure = error if isinstance(error, GatewayError) else Unavailable(f"backend error: {error}")
            for group in groups:
                if not group.request.future.done():
                    group.request.future.set_exception(failure)

    def _upstream(self, lane: Lane) -> int:
        """Samples queued at or running in the segments before `lane`'s."""
        return sum(self.in_lane[earlier] for earlier in self.segment_lanes[:lane.position])

    async def _maybe_wait_for_more(self, lane: Lane) -> None:
        """Wait (bounded) for samples still in earlier segments, if the batch is not full."""
        max_wait = self.settings.max_wait_ms / 1000
        if max_wait <= 0 or lane.direct or lane.position == 0:
            return
        wakeup = self._wakeups[lane]
        deadline = time.monotonic() + max_wait
        while (self._queued(lane) < self.settings.max_batch_size and self._upstream(lane) > 0
               and (remaining := deadline - time.monotonic()) > 0):
            wakeup.clear()
            timer = self._loop.call_later(remaining, wakeup.set)  # a timeout without a task per wait
            try:
                await wakeup.wait()
            finally:
                timer.cancel()

    def _dispatch(self, lane: Lane, groups: list[_Group], logits: np.ndarray, features: np.ndarray | None) -> None:
        """Each sample of a segment lane leaves at its exit or continues in the next segment."""
        stage = lane.position
        now = time.monotonic()
        batch_scores = _BatchScores(logits)
        next_ms = None if stage == self.stages - 1 else self._predicted_ms(stage + 1)
        offset, answered = 0, 0
        for group in groups:
            count = len(group.samples)
            rows = slice(offset, offset + count)
            offset += count
            self._record_stage_time(stage, (now - group.enqueued) * 1000)
            request = group.request
            if request.future.done():  # cancelled by the client, or failed
                continue
            scores = batch_scores(request.options.score)[rows]
            stop = should_stop(stage, scores, request.options, self.plan,
                               elapsed_ms=(now - request.started) * 1000, next_stage_ms=next_ms)
            stopping = int(np.count_nonzero(stop))
            answered += stopping
            if stopping == count:
                request.answer(group.samples, logits[rows], stage, scores)
                continue
            if stopping:
                request.answer(group.samples[stop], logits[rows][stop], stage, scores[stop])
                go_on = ~stop
                continuing = _Group(request, group.samples[go_on], features[rows][go_on])
            else:  # all continue: the rows themselves, no copy
                continuing = _Group(request, group.samples, features[rows])
            self._enqueue(self.segment_lanes[stage + 1], continuing)
        if self.metrics and answered:
            self._exit_counters[stage].inc(answered)

    def _dispatch_direct(self, lane: Lane, groups: list[_Group], logits: np.ndarray) -> None:
        """Every sample of a direct lane leaves at that lane's exit."""
        index = lane.position
        batch_scores = _BatchScores(logits)
        offset, answered = 0, 0
        for group in groups:
            count = len(group.samples)
            rows = slice(offset, offset + count)
            offset += count
            request = group.request
            if request.future.done():
                continue
            request.answer(group.samples, logits[rows], index, batch_scores(request.options.score)[rows])
            answered += count
        if self.metrics and answered:
            self._exit_counters[index].inc(answered)

    def _record_stage_time(self, stage: int, milliseconds: float, alpha: float = 0.1) -> None:
        previous = self.stage_ms[stage]
        self.stage_ms[stage] = milliseconds if previous is None else (1 - alpha) * previous + alpha * milliseconds

    def _predicted_ms(self, stage: int) -> float | None:
        estimate = self.stage_ms[stage]
        return None if estimate is None else estimate * self.settings.budget_margin
