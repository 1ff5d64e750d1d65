"""The cascade: samples run stage by stage; those that continue, from all concurrent
requests, are re-batched at every stage. Requests for one fixed exit (policies
`fixed` and `full`) skip the staging and run that exit's per-exit model in one
call, batched the same way, when the backend has per-exit models.

Each lane (a `Lane`: one segment, or one exit's per-exit model) has a queue. One
scheduler (`_pump`, run once per event-loop iteration when something changed)
gives each free backend slot (`workers` of them) to the lane whose first request
has the earliest deadline, and that lane's batch takes everything queued (up to
the maximum batch) in deadline order, so a lone request never waits; under load,
work piles up while batches run and the next batch is larger. A deep segment whose
batch is not full may wait up to `max_wait_ms` for samples still upstream.

Requests are answered exactly once, whatever fails (issue 25):
- every request has a deadline (its client's, or the server's default); a timer
  takes an expired request out of every queue and answers it `DeadlineExceeded`;
  a request whose client left (its task cancelled) leaves the queues too, so
  their samples never reach another backend call;
- queues are ordered earliest deadline first; a request's deadline for ordering is
  the earlier of its deadline and the end of its latency budget, and otherwise
  its arrival (plus the default timeout), so cascade requests already in deep
  stages go before direct ones that arrived later, and a request whose budget
  cannot be met even at the first exit runs first and answers from that exit;
- the budget policy continues a request only if the next segment would finish
  within its budget less a reserve (`next_stage_ms`: each lane's batch time as a
  line fitted to its recent batches, the work of every lane queued before it in
  deadline order and the batches running, then the batch it joins); past its first
  exit a budget request has an answer, so its deeper stages are optional work,
  queued after every request's mandatory work (no first exit waits behind them),
  and answered from the exit it passed when the next stage can no longer end
  within the budget less the reserve (no deep stage runs late), or, if its batch
  has not ended by then, at that moment (the batch's rows for it are ignored);
  with `optional_nice` they run on one backend thread of their own at that nice
  value, never on the `workers` slots (at most one optional batch at a time, and
  a first stage never waits for a slot behind one);
- admission control bounds the images inside the cascade (`max_queue_images`):
  beyond it a request is refused at once with `Overloaded` (429 / RESOURCE_EXHAUSTED);
- any exception in a stage (the backend call, or the dispatch after it) fails that
  batch's requests with a logged and counted error; the counters stay right;
- `stop` answers whatever has not finished within its grace period `Unavailable`.

Backend calls run on `workers` threads; decisions and bookkeeping run on the
event loop. The per-request and per-stage cost is kept small (issue 19): one
hand-off to a backend thread per batch (a queue put) and one call back to the
event loop per batch (`call_soon_threadsafe`), no task or future per batch; one
float32 softmax per batch; a request answered by one batch keeps that batch's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import heapq
import itertools
import logging
import math
import os
import queue
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np

from serving.backends import StageBackend
from serving.errors import DeadlineExceeded, GatewayError, Overloaded, Unavailable
from serving.metrics import GatewayMetrics
from serving.policy import ExitPlan, RequestOptions, confidence_scores, should_stop, softmax

log = logging.getLogger("gateway.cascade")

NO_DEADLINE_ORDER_S = 3600.0  # ordering key of a request without a deadline: its arrival plus this
# Added to the ordering key of a budget request's deeper stages: optional work (the request has an answer
# from the exit it passed) goes after every request's mandatory work, whatever their deadlines.
OPTIONAL_ORDER_S = 2 * NO_DEADLINE_ORDER_S
CONTINUE_ALPHA = 0.05  # weight of a batch in the moving average of the share of samples going on
TRIM_AFTER_IDLE_S = 1.0  # an idle cascade gives freed heap memory back to the system after this
TRIM_AFTER_IMAGES = 256  # ... when at least this many images went through since the last time


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere: returns the heap's free pages to the system (the
    arenas of the backend threads keep what bursts of requests freed, otherwise)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


@dataclass(frozen=True)
class CascadeResult:
    logits: np.ndarray  # (N, classes) of the exit each sample left at
    exit_index: np.ndarray  # (N,) position of that exit in the plan
    confidence: np.ndarray  # (N,) the request's score at that exit


@dataclass(slots=True, eq=False)
class _Request:
    options: RequestOptions
    size: int
    started: float
    future: asyncio.Future
    deadline: float  # time.monotonic() after which it is answered DeadlineExceeded (inf: none)
    key: float  # its order in every queue: earliest first
    remaining: int = 0
    # (samples, logits, exit position, confidence) of the samples answered so far, per batch.
    parts: list = field(default_factory=list)
    waiting: list = field(default_factory=list)  # its groups queued (not running) in some lane
    timer: asyncio.TimerHandle | None = None
    images: np.ndarray | None = None  # its normalised inputs: what a stage that takes the image gets again

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


@dataclass(slots=True, eq=False)
class _Group:
    """Samples of one request waiting at (or running in) one lane."""

    request: _Request
    samples: np.ndarray  # indices into the request
    inputs: np.ndarray | None  # None once dropped (its memory goes at once)
    lane: Lane | None = None
    live: bool = True  # False once taken into a batch or dropped: the queue skips it
    # Budget policy: (exit position, logits, scores) of the exit its samples passed, what they answer
    # with if the next stage cannot start in time (at `give_up_at`, a time.monotonic(); its timer).
    fallback: tuple | None = None
    budget_end: float = math.inf  # its request's start + budget less the reserve (time.monotonic())
    give_up_at: float = math.inf
    give_up: asyncio.TimerHandle | None = None  # while it waits: `_give_up`; while its batch runs: `_abandon`
    abandoned: bool = False  # answered from its fallback while its batch ran: the batch's rows are ignored


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


class LaneCost:
    """A lane's batch time as a line, fixed + per sample (ms): a weighted least-squares fit through the
    (batch size, backend ms) of its recent batches (exponentially weighted sums), so the estimate of a
    batch of any size follows what the backend does now. Until batches of different sizes were seen,
    the per-sample cost is the mean time per sample (no fixed part: an over-estimate for large batches)."""

    __slots__ = ("alpha", "weight", "size", "ms", "size2", "size_ms")

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.weight = self.size = self.ms = self.size2 = self.size_ms = 0.0

    @property
    def known(self) -> bool:
        return self.weight > 0

    def observe(self, size: int, milliseconds: float) -> None:
        keep = 1 - self.alpha if self.weight else 0.0
        new = 1 - keep
        self.weight = 1.0
        self.size = keep * self.size + new * size
        self.ms = keep * self.ms + new * milliseconds
        self.size2 = keep * self.size2 + new * size * size
        self.size_ms = keep * self.size_ms + new * size * milliseconds

    def line(self) -> tuple[float, float]:
        """(fixed ms, ms per sample) of a batch."""
        variance = self.size2 - self.size * self.size
        if variance > 1e-9 * max(self.size2, 1.0):
            per_sample = (self.size_ms - self.size * self.ms) / variance
            fixed = self.ms - per_sample * self.size
            if per_sample > 0 and fixed >= 0:
                return fixed, per_sample
        return 0.0, self.ms / max(self.size, 1e-9)

    def batch_ms(self, size: int) -> float:
        fixed, per_sample = self.line()
        return fixed + per_sample * size if size > 0 else 0.0

    def work_ms(self, samples: int, max_batch: int) -> float:
        """Backend time of `samples` run in full batches of `max_batch` (the last one partial)."""
        if samples <= 0:
            return 0.0
        fixed, per_sample = self.line()
        return math.ceil(samples / max_batch) * fixed + per_sample * samples


class _Backlog:
    """What waits for the backend slots at one moment, by order key (the budget estimate's input):
    per lane, the live samples queued (sorted by key) and the samples running."""

    def __init__(self, cascade: Cascade) -> None:
        self.keys: dict[Lane, list[float]] = {}
        self.cumulative: dict[Lane, list[int]] = {}
        for lane in cascade.lanes:
            entries = sorted((key, len(group.samples)) for key, _, group in
                             itertools.chain(cascade.queues[lane], cascade.optional_queues.get(lane, ()))
                             if group.live)
            self.keys[lane] = [key for key, _ in entries]
            self.cumulative[lane] = list(itertools.accumulate(count for _, count in entries))
        self.running = {lane: cascade.in_lane[lane] - cascade.queued[lane] for lane in cascade.lanes}

    def before(self, lane: Lane, key: float) -> int:
        """Live samples queued in `lane` whose order key is before `key`."""
        position = bisect_left(self.keys[lane], key)
        return self.cumulative[lane][position - 1] if position else 0

    def queued(self, lane: Lane) -> int:
        return self.cumulative[lane][-1] if self.cumulative[lane] else 0


@dataclass(frozen=True, eq=False)
class Lane:
    """One queue of the cascade: the segment that ends at exit `position` of the plan,
    or (direct) that exit's per-exit model, which runs the whole prefix on the images
    in one call. The cascade makes each lane once, so lanes compare and hash by
    identity (a cheap dictionary key on the hot path)."""

    position: int  # of the exit in the plan
    direct: bool = False


@dataclass(frozen=True)
class CascadeSettings:
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    workers: int = 2
    budget_margin: float = 1.1  # predicted stage time is multiplied by this for the budget policy
    # Share of a budget kept for what the cascade does not see (front end, transport, the load that a
    # deeper stage adds to everyone's queue): a request continues only if it would finish before the rest.
    budget_reserve: float = 0.2
    max_queue_images: int = 0  # images admitted at once (0: no bound)
    health_interval_s: float = 0.25  # how often a backend with a health check is polled
    # Nice value of the backend threads (Linux; 0: the process's): when the gateway's cores are saturated
    # the event loop, which admits, refuses and answers requests, runs before more backend work.
    backend_nice: int = 0
    # Budget requests' optional deeper stages run on one backend thread of their own at this nice value
    # (Linux), never on the `workers` slots, so they cannot hold a slot that a first stage needs, and on a
    # saturated core they yield to the mandatory work when it is higher than `backend_nice` (None: no such
    # thread, they share the slots; the gateway's --optional-nice).
    optional_nice: int | None = None


def default_queue_images(per_image_ms: float | None, workers: int, queue_ms: float, minimum: int,
                         unprofiled: int = 4096) -> int:
    """The admission bound: `queue_ms` of work at `per_image_ms` (the full network's cost per image
    at the largest profiled batch) on `workers` slots, at least `minimum`; `unprofiled` without a profile."""
    if not per_image_ms or per_image_ms <= 0:
        return max(unprofiled, minimum)
    return max(minimum, int(queue_ms / per_image_ms * workers))


async def until_quiet(cascade, quiet_s: float = 0.2, at_most_s: float = 2.0) -> None:
    """After a drain: wait (bounded) until no new request has been refused for `quiet_s`. Clients
    still sending (gRPC calls queued behind the connection's stream limit, say) get their
    UNAVAILABLE answers before the front ends close, instead of a cancelled call."""
    end = time.monotonic() + at_most_s
    while time.monotonic() < end and time.monotonic() - cascade.last_refusal < quiet_s:
        await asyncio.sleep(quiet_s / 4)


class Cascade:
    def __init__(self, backend: StageBackend, plan: ExitPlan, settings: CascadeSettings,
                 metrics: GatewayMetrics | None = None, profiled_ms: list[float | None] | None = None,
                 fallback: StageBackend | None = None) -> None:
        self.backend, self.plan, self.settings, self.metrics = backend, plan, settings, metrics
        self.fallback = fallback  # runs the stages while `backend` is unhealthy (if given)
        stages = len(plan.depths)
        self.stages = stages
        self.direct = bool(getattr(backend, "has_exit_models", False)) and (
            fallback is None or bool(getattr(fallback, "has_exit_models", False)))
        self.segment_lanes = [Lane(position) for position in range(stages)]
        self.direct_lanes = [Lane(position, direct=True) for position in range(stages)] if self.direct else []
        self.lanes = [*self.segment_lanes, *self.direct_lanes]
        self.queues: dict[Lane, list] = {lane: [] for lane in self.lanes}  # heaps of (key, sequence, group)
        # With an optional slot, the budget requests' optional groups wait in heaps of their own, per segment.
        self.optional_queues: dict[Lane, list] = {lane: [] for lane in self.segment_lanes}
        self.queued: dict[Lane, int] = dict.fromkeys(self.lanes, 0)  # live samples waiting in each lane
        self.in_lane: dict[Lane, int] = dict.fromkeys(self.lanes, 0)  # samples waiting or running in each
        self._waiting_since: dict[Lane, float] = dict.fromkeys(self.lanes, 0.0)
        # Moving average of one batch's backend time in each lane, in ms (seeded by the profile).
        self.run_ms: dict[Lane, float | None] = dict.fromkeys(self.lanes)
        # Each lane's batch time by batch size (the budget policy's estimate), seeded by the profile.
        self.costs: dict[Lane, LaneCost] = {lane: LaneCost() for lane in self.lanes}
        for lane, profiled in zip(self.segment_lanes, profiled_ms or []):
            self.run_ms[lane] = profiled
            if profiled:
                self.costs[lane].observe(1, profiled)
        self._direct_lane_of = {depth: lane for depth, lane in zip(plan.depths, self.direct_lanes)}
        # Moving average, per segment, of the share of a non-budget request's samples that went on to the
        # next one (what a confidence request's path is expected to be; 0 until seen: stage 0 only).
        self.continue_share = [0.0] * stages
        self.images_in = 0  # images of the requests inside the cascade (admission control bounds it)
        self.requests: set[_Request] = set()
        self.backend_ready = True
        self.cut = 0  # requests answered Unavailable because stop's grace period ended
        self.last_refusal = 0.0  # time.monotonic() of the last request refused while stopping
        self.dropped = {"expired": 0, "cancelled": 0, "failed": 0}  # samples dropped from queues
        self.failed_batches = 0
        self.gave_up = 0  # samples of budget requests answered from the exit they passed (no time left)
        self._has_health = callable(getattr(backend, "healthy", None))
        # Stages that take the request's images again (a composed cascade's later networks), not activations.
        self.image_stages = frozenset(getattr(backend, "image_stages", ()))
        self._timeouts = bool(getattr(backend, "accepts_timeout", False))
        if metrics:
            self._stage_metrics = {lane: metrics.stage(f"{plan.depths[lane.position]}-direct" if lane.direct
                                                       else str(plan.depths[lane.position]))
                                   for lane in self.lanes}
            self._exit_counters = [metrics.exits.labels(depth=str(depth)) for depth in plan.depths]
            metrics.queue_depth.set_function(lambda: self.queue_depth)  # read when scraped
            metrics.admitted_images.set_function(lambda: self.images_in)
            metrics.backend_ready.set_function(lambda: float(self.backend_ready))
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # batches for the backend threads; None stops one
        self._optional_jobs: queue.SimpleQueue = queue.SimpleQueue()  # batches for the optional slot's thread
        self._optional_free = 0 if settings.optional_nice is None else 1  # the optional slot, when free
        self.abandoned = 0  # samples answered from their fallback while their optional batch ran
        self._threads: list[threading.Thread] = []
        self._sequence = itertools.count()
        self._free = settings.workers  # backend slots not running a batch
        self._pump_scheduled = False
        self._wait_timer: asyncio.TimerHandle | None = None
        self._health_task: asyncio.Task | None = None
        self._trim_timer: asyncio.TimerHandle | None = None
        self._images_since_trim = 0
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.accepting = False

    # -- life cycle ---------------------------------------------------------
    async def start(self, warmup_input: np.ndarray | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._threads = [threading.Thread(target=self._backend_thread, name=f"stage_{k}", daemon=True,
                                          args=(self._jobs, self.settings.backend_nice))
                         for k in range(self.settings.workers)]
        if self.settings.optional_nice is not None:
            self._threads.append(threading.Thread(target=self._backend_thread, name="stage_optional", daemon=True,
                                                  args=(self._optional_jobs, self.settings.optional_nice)))
        for thread in self._threads:
            thread.start()
        if warmup_input is not None:
            await self._warm_up(warmup_input)
        if self._has_health:
            self._health_task = asyncio.create_task(self._watch_health())
        self.accepting = True

    async def _warm_up(self, sample: np.ndarray) -> None:
        """One batch-1 call per stage: first calls are slow, and it seeds the estimates."""
        inputs = sample
        for lane in self.segment_lanes:
            started = time.monotonic()
            _, features = await asyncio.to_thread(self.backend.run, lane.position, inputs)
            if self.run_ms[lane] is None:
                self.run_ms[lane] = (time.monotonic() - started) * 1000
            if not self.costs[lane].known:
                self.costs[lane].observe(len(sample), (time.monotonic() - started) * 1000)
            inputs = sample if lane.position + 1 in self.image_stages else features
        for lane in self.direct_lanes:
            started = time.monotonic()
            await asyncio.to_thread(self.backend.run_exit, lane.position, sample)
            if not self.costs[lane].known:
                self.costs[lane].observe(len(sample), (time.monotonic() - started) * 1000)
        if self.fallback is not None:  # its first calls are slow too
            await asyncio.to_thread(self.fallback.run, 0, sample)

    async def _watch_health(self) -> None:
        """Poll the backend's health: readiness follows it, and it reconnects when it returns."""
        while True:
            try:
                healthy = await asyncio.to_thread(self.backend.healthy)
            except Exception:  # a health check that raises is a failed one
                healthy = False
            if healthy != self.backend_ready:
                if healthy:
                    reconnect = getattr(self.backend, "reconnect", None)
                    if reconnect is not None:
                        await asyncio.to_thread(reconnect)
                    log.warning("backend available again", extra={"fields": {"backend": self.backend.name}})
                else:
                    log.error("backend unavailable: not ready until it answers its health check again"
                              + ("; running on the fallback backend" if self.fallback is not None else ""),
                              extra={"fields": {"backend": self.backend.name}})
                self.backend_ready = healthy
            await asyncio.sleep(self.settings.health_interval_s)

    @property
    def ready(self) -> bool:
        """Accepting requests, with a backend (or its fallback) that can run them."""
        return self.accepting and (self.backend_ready or self.fallback is not None)

    async def stop(self, timeout: float = 30.0) -> int:
        """Stop accepting, let in-flight requests finish (up to `timeout`), answer the others
        Unavailable, then stop the workers. Returns the number of requests cut."""
        self.accepting = False
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        unfinished = [request for request in self.requests if not request.future.done()]
        if unfinished:
            self.cut += len(unfinished)
            if self.metrics:
                self.metrics.shutdown_cut.inc(len(unfinished))
            log.error("shutdown: requests not finished within the grace period answered UNAVAILABLE",
                      extra={"fields": {"requests": len(unfinished), "grace_s": timeout,
                                        "images": sum(request.size for request in unfinished)}})
            for request in unfinished:
                self._fail(request, Unavailable("the gateway shut down before this request finished"), "failed")
            await asyncio.sleep(0)  # their handlers answer before the workers go
        await until_quiet(self)
        if self._health_task is not None:
            self._health_task.cancel()
        for timer in (self._wait_timer, self._trim_timer):
            if timer is not None:
                timer.cancel()
        for thread in self._threads:
            (self._optional_jobs if thread.name == "stage_optional" else self._jobs).put(None)
        # A backend call stuck past every deadline must not hold the shutdown: the threads are daemons.
        await asyncio.to_thread(lambda: [thread.join(timeout=5) for thread in self._threads])
        for backend in (self.backend, self.fallback):
            if backend is not None:
                backend.close()
        return len(unfinished)

    @property
    def queue_depth(self) -> int:
        return sum(self.in_lane.values())

    def retry_after_s(self) -> float:
        """How long the images inside the cascade take to drain, roughly (for Retry-After)."""
        per_batch = [ms for lane, ms in self.run_ms.items() if ms and not lane.direct]
        batch_ms = sum(per_batch) if per_batch else 100.0
        batches = self.images_in / self.settings.max_batch_size
        return max(1.0, batches * batch_ms / 1000 / self.settings.workers)

    # -- requests -----------------------------------------------------------
    def overloaded(self, size: int) -> Overloaded | None:
        """Admission control: the refusal of a request of `size` images now (None: it would be admitted).
        The front ends ask before decoding a request, so that a refusal costs no decode or copy."""
        bound = self.settings.max_queue_images
        if bound and self.images_in and self.images_in + size > bound:
            return Overloaded(f"the gateway is at capacity ({self.images_in} images in the cascade, limit "
                              f"{bound}); retry later", self.retry_after_s())
        return None

    async def infer(self, inputs: np.ndarray, options: RequestOptions, deadline: float | None = None) -> CascadeResult:
        """Run a batch of images (already normalised) through the cascade; `deadline` is a
        time.monotonic() by which it must be answered (or DeadlineExceeded)."""
        if not self.accepting:
            self.last_refusal = time.monotonic()
            raise Unavailable("the gateway is shutting down")
        if not (self.backend_ready or self.fallback is not None):
            raise Unavailable("the backend is not available")
        now = time.monotonic()
        size = len(inputs)
        refusal = self.overloaded(size)
        if refusal is not None:
            raise refusal
        if deadline is None:
            deadline, key = math.inf, now + NO_DEADLINE_ORDER_S
        else:
            if deadline <= now:
                raise DeadlineExceeded("the request's deadline passed before it was queued")
            key = deadline
        if options.budget_ms is not None:
            key = min(key, now + options.budget_ms / 1000)
        request = _Request(options, size, now, self._loop.create_future(), deadline, key, images=inputs)
        if deadline < math.inf:
            request.timer = self._loop.call_later(deadline - now, self._expire, request)
        self.requests.add(request)
        self.images_in += size
        self._idle.clear()
        lane = self.segment_lanes[0]
        if self.direct and options.policy in ("fixed", "full"):
            lane = self._direct_lane_of[options.exit_depth if options.policy == "fixed" else self.plan.depths[-1]]
        try:
            maximum = self.settings.max_batch_size
            if size <= maximum:
                self._enqueue(lane, _Group(request, np.arange(size), inputs))
            else:
                for start in range(0, size, maximum):
                    stop = min(start + maximum, size)
                    self._enqueue(lane, _Group(request, np.arange(start, stop), inputs[start:stop]))
            self._schedule_pump()
            await request.future
            return request.result()
        finally:
            if request.waiting:  # the client left (its task was cancelled): out of every queue
                self._drop(request, "cancelled")
            if request.timer is not None:
                request.timer.cancel()
            self.requests.discard(request)
            self.images_in -= size
            self._images_since_trim += size
            if not self.requests:
                self._idle.set()
                if self._trim_timer is None and self._images_since_trim >= TRIM_AFTER_IMAGES:
                    self._trim_timer = self._loop.call_later(TRIM_AFTER_IDLE_S, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        """Memory back to its baseline when idle: freed heap pages go back to the system."""
        self._trim_timer = None
        if not self.requests:
            self._images_since_trim = 0
            self._loop.run_in_executor(None, self._release_memory)

    def _release_memory(self) -> None:
        """(A worker thread) the backends' arenas, then the heap's free pages, back to the system."""
        for backend in (self.backend, self.fallback):
            release = getattr(backend, "release_memory", None)
            if release is not None:
                try:
                    release()
                except Exception:  # a best effort: memory stays, requests are unaffected
                    log.warning("releasing the backend's memory failed", exc_info=True)
        if MALLOC_TRIM is not None:
            MALLOC_TRIM(0)

    def _expire(self, request: _Request) -> None:
        """Its deadline passed: answered DeadlineExceeded and taken out of every queue."""
        self._fail(request, DeadlineExceeded("the request's deadline passed before it was answered"), "expired")

    def _fail(self, request: _Request, error: Exception, reason: str) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._drop(request, reason)

    def _drop(self, request: _Request, reason: str) -> None:
        """Take the request's waiting groups out of their queues (left in the heaps, skipped)."""
        dropped = 0
        for group in request.waiting:
            count = len(group.samples)
            group.live, group.inputs = False, None
            if group.give_up is not None:
                group.give_up.cancel()
            self.queued[group.lane] -= count
            self.in_lane[group.lane] -= count
            dropped += count
        request.waiting.clear()
        if dropped:
            self.dropped[reason] += dropped
            if self.metrics:
                self.metrics.dropped_samples.labels(reason).inc(dropped)
            self._schedule_pump()  # a waiting deep lane may no longer have to wait

    def _enqueue(self, lane: Lane, group: _Group, key: float | None = None) -> None:
        group.lane = lane
        optional = group.fallback is not None and self.settings.optional_nice is not None
        heap = self.optional_queues[lane] if optional else self.queues[lane]
        heapq.heappush(heap, (group.request.key if key is None else key, next(self._sequence), group))
        group.request.waiting.append(group)
        if not self.queued[lane]:
            self._waiting_since[lane] = time.monotonic()
        count = len(group.samples)
        self.queued[lane] += count
        self.in_lane[lane] += count

    # -- scheduling -----------------------------------------------------------
    def _schedule_pump(self) -> None:
        """Run the scheduler once, after what else this event-loop iteration brings."""
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Give every free backend slot a batch: the ready lane whose first request is due first."""
        self._pump_scheduled = False
        now = time.monotonic()
        wake = math.inf
        while self._free > 0:
            lane, wake = self._best_lane(now)
            if lane is None:
                break
            groups = self._take_batch(lane, now)
            if groups:
                self._submit(lane, groups)
        # The optional slot, while a worker slot is free (no mandatory work waits for one): the segment whose
        # first optional group is due first.
        while self._optional_free > 0 and self._free > 0:
            lane = self._best_optional_lane()
            if lane is None:
                break
            groups = self._take_batch(lane, now, self.optional_queues[lane])
            if groups:
                self._submit(lane, groups, optional=True)
        if wake < math.inf and self._free > 0:  # a deep lane waits for samples upstream: look again then
            if self._wait_timer is not None:
                self._wait_timer.cancel()
            self._wait_timer = self._loop.call_later(max(0.0, wake - now), self._schedule_pump)

    def _best_lane(self, now: float) -> tuple[Lane | None, float]:
        best, best_key, wake = None, math.inf, math.inf
        for lane in self.lanes:
            heap = self.queues[lane]
            while heap and not heap[0][2].live:
                heapq.heappop(heap)
            if not heap or heap[0][0] >= best_key:
                continue
            if self._must_wait(lane, now):
                wake = min(wake, self._waiting_since[lane] + self.settings.max_wait_ms / 1000)
                continue
            best, best_key = lane, heap[0][0]
        return best, wake

    def _best_optional_lane(self) -> Lane | None:
        best, best_key = None, math.inf
        for lane, heap in self.optional_queues.items():
            while heap and not heap[0][2].live:
                heapq.heappop(heap)
            if heap and heap[0][0] < best_key:
                best, best_key = lane, heap[0][0]
        return best

    def _must_wait(self, lane: Lane, now: float) -> bool:
        """A deep segment whose batch is not full waits (bounded) for samples still upstream."""
        max_wait = self.settings.max_wait_ms / 1000
        if max_wait <= 0 or lane.direct or lane.position == 0:
            return False
        if self.queued[lane] >= self.settings.max_batch_size or now >= self._waiting_since[lane] + max_wait:
            return False
        return any(self.in_lane[earlier] for earlier in self.segment_lanes[:lane.position])

    def _take_batch(self, lane: Lane, now: float, heap: list | None = None) -> list[_Group]:
        """Up to a maximum batch of live groups, earliest deadline first; requests whose deadline
        passes before a batch of this lane usually finishes are answered DeadlineExceeded instead.
        A budget group taken is answered from its fallback if the batch has not ended by its budget's end."""
        heap = self.queues[lane] if heap is None else heap
        taken, size = [], 0
        expected = (self.run_ms[lane] or 0.0) / 1000  # a batch's usual backend time in this lane
        entry = self.segment_lanes[0] if heap is self.queues[self.segment_lanes[0]] else None
        bound_ms = None  # (stage 0) the longest path any request could be predicted, made when first needed
        cost, optional_end = self.costs[lane], math.inf  # the earliest budget end of the batch's budget groups
        while heap:
            group = heap[0][2]
            if not group.live:
                heapq.heappop(heap)
                continue
            request = group.request
            count = len(group.samples)
            ends = now + cost.batch_ms(size + count) / 1000  # this batch's end with the group in it
            if group.fallback is not None and ends > group.budget_end:
                self._answer_fallback(group)  # in this batch, its optional stage would end past the budget
                continue
            if ends > optional_end:  # it would make a budget request already in the batch late
                break
            if request.deadline <= now + expected:  # expired, or would be before this batch is done
                self._expire(request)
                continue
            if lane is entry and request.deadline < math.inf:
                spare_ms = (request.deadline - now - expected) * 1000
                if bound_ms is None:
                    bound_ms = self.path_bound_ms()
                # Its deeper stages would end after its deadline: stage 0 for nothing (the bound first, which
                # every request with time to spare passes at once).
                if bound_ms > spare_ms and self.path_ms(request, count) > spare_ms:
                    self._expire(request)
                    continue
            if taken and size + count > self.settings.max_batch_size:
                break
            heapq.heappop(heap)
            group.live = False
            if group.give_up is not None:
                group.give_up.cancel()
                group.give_up = None
            request.waiting.remove(group)
            if group.fallback is not None:
                optional_end = min(optional_end, group.budget_end)
                group.give_up = self._loop.call_later(max(0.0, group.budget_end - now), self._abandon, group)
            self.queued[lane] -= count
            taken.append(group)
            size += count
        if self.queued[lane]:
            self._waiting_since[lane] = now
        return taken

    def _submit(self, lane: Lane, groups: list[_Group], optional: bool = False) -> None:
        if optional:
            self._optional_free -= 1
        else:
            self._free -= 1
        try:
            batch = groups[0].inputs if len(groups) == 1 else np.concatenate([g.inputs for g in groups])
        except Exception as error:  # nothing reaches a backend: the batch fails here
            if optional:
                self._optional_free += 1
            else:
                self._free += 1
            self.in_lane[lane] -= sum(len(group.samples) for group in groups)
            self._settle_timers(groups)
            self._batch_failed(lane, groups, error)
            return
        latest = max(group.request.deadline for group in groups)
        (self._optional_jobs if optional else self._jobs).put((lane, groups, batch, latest, optional))

    def _backend_thread(self, jobs: queue.SimpleQueue, nice: int) -> None:
        """A backend thread: runs batches, hands each outcome back to the event loop in one call."""
        if nice:  # below the event loop: it admits, refuses and answers first
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        while (job := jobs.get()) is not None:
            lane, groups, batch, deadline, optional = job
            backend = self.backend if self.backend_ready or self.fallback is None else self.fallback
            started, cpu = time.monotonic(), time.thread_time()
            try:
                kwargs = {}
                if self._timeouts and backend is self.backend and deadline < math.inf:
                    kwargs["timeout_s"] = max(0.001, deadline - started)
                if lane.direct:
                    outcome = backend.run_exit(lane.position, batch, **kwargs), None
                else:
                    outcome = backend.run(lane.position, batch, **kwargs)
            except Exception as error:  # a failing backend fails this batch's requests, not the worker
                outcome = error
            cpu = time.thread_time() - cpu
            try:
                self._loop.call_soon_threadsafe(self._finish_batch, lane, groups, len(batch), outcome, started,
                                                time.monotonic(), cpu, optional)
            except RuntimeError:  # the event loop is closed: nobody waits for this batch
                pass

    def _finish_batch(self, lane: Lane, groups: list[_Group], size: int, outcome, started: float,
                      finished: float, cpu_seconds: float, optional: bool = False) -> None:
        """On the event loop: a backend call's outcome to its requests. Whatever raises here
        fails this batch's requests; the slot and the counters are settled first."""
        if optional:
            self._optional_free += 1
        else:
            self._free += 1
        self.in_lane[lane] -= size
        self._settle_timers(groups)
        try:
            if self.metrics:
                self._stage_metrics[lane].observe(size, finished - started, cpu_seconds)
            if isinstance(outcome, BaseException):
                raise outcome
            self._record_run_ms(lane, (finished - started) * 1000)
            self.costs[lane].observe(size, (finished - started) * 1000)
            logits, features = outcome
            if lane.direct:
                self._dispatch_direct(lane, groups, logits)
            else:
                self._dispatch(lane, groups, logits, features)
        except Exception as error:
            self._batch_failed(lane, groups, error)
        finally:
            self._schedule_pump()

    @staticmethod
    def _settle_timers(groups: list[_Group]) -> None:
        """A batch is over: its budget groups' timers go."""
        for group in groups:
            if group.give_up is not None:
                group.give_up.cancel()
                group.give_up = None

    def _batch_failed(self, lane: Lane, groups: list[_Group], error: Exception) -> None:
        """Log and count a failed stage batch; its requests are answered with the error."""
        stage = f"{self.plan.depths[lane.position]}{'-direct' if lane.direct else ''}"
        self.failed_batches += 1
        if self.metrics:
            self.metrics.backend_errors.labels(stage).inc()
        requests = {id(group.request): group.request for group in groups}
        if isinstance(error, GatewayError):
            log.error("stage batch failed", extra={"fields": {"stage": stage, "requests": len(requests),
                                                              "error": str(error)}})
            failure = error
        else:
            log.error("stage batch failed", exc_info=error,
                      extra={"fields": {"stage": stage, "requests": len(requests)}})
            failure = Unavailable("the backend failed on this request's batch")
        for request in requests.values():
            self._fail(request, failure, "failed")

    def _dispatch(self, lane: Lane, groups: list[_Group], logits: np.ndarray, features: np.ndarray | None) -> None:
        """Each sample of a segment lane leaves at its exit or continues in the next segment."""
        stage = lane.position
        now = time.monotonic()
        batch_scores = _BatchScores(logits)
        last = stage == self.stages - 1
        takes_image = stage + 1 in self.image_stages  # the next stage runs on the images again
        backlog = None  # what waits for the backend slots, made when a budget request first needs it
        continued = 0  # samples of this batch enqueued in the next segment so far (before the next group's)
        offset, answered = 0, 0
        mandatory = mandatory_stopped = 0  # samples of non-budget requests, and those that left here
        for group in groups:
            count = len(group.samples)
            rows = slice(offset, offset + count)
            offset += count
            request = group.request
            if request.future.done() or group.abandoned:  # expired, cancelled, failed or answered meanwhile
                continue
            if request.deadline <= now:
                self._expire(request)
                continue
            scores = batch_scores(request.options.score)[rows]
            next_ms = None
            if not last and request.options.policy == "budget":
                if backlog is None:
                    backlog = _Backlog(self)
                next_ms = self.next_stage_ms(backlog, stage + 1, request.key + OPTIONAL_ORDER_S, count, continued)
                if next_ms is not None:
                    next_ms += self.settings.budget_reserve * request.options.budget_ms
            stop = should_stop(stage, scores, request.options, self.plan,
                               elapsed_ms=(now - request.started) * 1000, next_stage_ms=next_ms)
            stopping = int(np.count_nonzero(stop))
            answered += stopping
            if request.options.policy != "budget":
                mandatory += count
                mandatory_stopped += stopping
            if stopping == count:
                request.answer(group.samples, logits[rows], stage, scores)
                continue
            if stopping:
                request.answer(group.samples[stop], logits[rows][stop], stage, scores[stop])
                go_on = ~stop
                samples = group.samples[go_on]
                continuing = _Group(request, samples, request.images[samples] if takes_image else features[rows][go_on])
            else:  # all continue: the rows themselves, no copy
                continuing = _Group(request, group.samples,
                                    request.images[group.samples] if takes_image else features[rows])
            if request.options.policy == "budget":
                go = ~stop
                self._enqueue_optional(self.segment_lanes[stage + 1], continuing, stage, logits[rows][go], scores[go])
            else:
                self._enqueue(self.segment_lanes[stage + 1], continuing)
            if backlog is not None:  # (what went on before the backlog was made is in it)
                continued += len(continuing.samples)
        if not last and mandatory:
            share = 1.0 - mandatory_stopped / mandatory
            self.continue_share[stage] += CONTINUE_ALPHA * (share - self.continue_share[stage])
        if self.metrics and answered:
            self._exit_counters[stage].inc(answered)

    def _enqueue_optional(self, lane: Lane, group: _Group, stage: int, logits: np.ndarray,
                          scores: np.ndarray) -> None:
        """A budget request's samples going on to `lane`: optional work, queued after every request's
        mandatory work; answered from exit `stage` (`logits`, `scores`) instead if the stage cannot start
        early enough to end within the budget less its reserve."""
        request = group.request
        group.fallback = (stage, logits, scores)
        self._enqueue(lane, group, request.key + OPTIONAL_ORDER_S)
        cost = self.costs[lane]
        stage_s = cost.batch_ms(len(group.samples)) / 1000 if cost.known else 0.0
        group.budget_end = request.started + request.options.budget_ms / 1000 * (1 - self.settings.budget_reserve)
        group.give_up_at = group.budget_end - stage_s
        group.give_up = self._loop.call_later(max(0.0, group.give_up_at - time.monotonic()), self._give_up, group)

    def _give_up(self, group: _Group) -> None:
        group.give_up = None
        if group.live and not group.request.future.done():
            self._answer_fallback(group)

    def _abandon(self, group: _Group) -> None:
        """Its optional batch has not ended by its budget's end (less the reserve): answered from the
        exit its samples passed now; the batch's rows for it are ignored when it ends."""
        group.give_up = None
        request = group.request
        if group.abandoned or request.future.done():
            return
        group.abandoned, count = True, len(group.samples)
        self.gave_up += count
        self.abandoned += count
        stage, logits, scores = group.fallback
        request.answer(group.samples, logits, stage, scores)
        if self.metrics:
            self._exit_counters[stage].inc(count)

    def _answer_fallback(self, group: _Group) -> None:
        """Out of its queue, answered from the exit its samples passed."""
        lane, count = group.lane, len(group.samples)
        group.live, group.inputs = False, None
        if group.give_up is not None:
            group.give_up.cancel()
            group.give_up = None
        group.request.waiting.remove(group)
        self.queued[lane] -= count
        self.in_lane[lane] -= count
        self.gave_up += count
        stage, logits, scores = group.fallback
        group.request.answer(group.samples, logits, stage, scores)
        if self.metrics:
            self._exit_counters[stage].inc(count)
        self._schedule_pump()

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

    # -- estimates for the budget policy --------------------------------------
    def _record_run_ms(self, lane: Lane, milliseconds: float, alpha: float = 0.1) -> None:
        previous = self.run_ms[lane]
        self.run_ms[lane] = milliseconds if previous is None else (1 - alpha) * previous + alpha * milliseconds

    def path_bound_ms(self) -> float:
        """An upper bound of `path_ms` for any request now: in every deeper segment, all it holds ahead,
        then a full batch."""
        maximum, total = self.settings.max_batch_size, 0.0
        for lane in self.segment_lanes[1:]:
            cost = self.costs[lane]
            if cost.known:
                total += cost.work_ms(self.in_lane[lane], maximum) / self.settings.workers + cost.batch_ms(maximum)
        return total

    def path_ms(self, request: _Request, count: int, upper: bool = False) -> float:
        """Predicted backend time (ms) after stage 0 until `count` samples of `request` entering stage 0 now
        have run the deeper stages they are expected to need (a fixed or full request: every stage to its
        exit; a confidence request: each stage with the chance that one of its samples gets there, from the
        moving share that went on, and the samples expected there). In each deeper stage, what runs or waits
        there with an earlier order key goes first (shared by the slots), then its own batch. Budget
        requests: 0 (only their first stage is mandatory). Lanes whose cost is unknown count 0. `upper`:
        everything in each stage counted as ahead (no look at the queues: a bound, O(stages))."""
        policy = request.options.policy
        if policy == "budget" or self.stages < 2:
            return 0.0
        last = self.stages - 1
        if policy == "fixed" and request.options.exit_depth in self.plan.depths:
            last = self.plan.depths.index(request.options.exit_depth)
        maximum, workers = self.settings.max_batch_size, self.settings.workers
        total, reach = 0.0, 1.0
        for stage in range(1, last + 1):
            if policy == "confidence":
                reach *= self.continue_share[stage - 1]
                if reach <= 0.0:
                    break
            cost = self.costs[self.segment_lanes[stage]]
            if not cost.known:
                continue
            expected = count * reach
            chance = 1.0 - (1.0 - reach) ** count  # that one of its samples gets here (it waits for that one)
            ahead = self.in_lane[self.segment_lanes[stage]] if upper else self._ahead(stage, request.key)
            total += chance * (cost.work_ms(ahead, maximum) / workers
                               + cost.batch_ms(min(maximum, max(1.0, expected))))
        return total

    def _ahead(self, stage: int, key: float) -> int:
        """Samples running in segment `stage` and those waiting there with an order key before `key`."""
        lane = self.segment_lanes[stage]
        if not self.in_lane[lane]:
            return 0
        waiting_before = sum(len(group.samples) for entry_key, _, group in self.queues[lane]
                             if group.live and entry_key < key)
        return self.in_lane[lane] - self.queued[lane] + waiting_before

    def next_stage_ms(self, backlog: _Backlog, stage: int, key: float, own: int, continued: int = 0) -> float | None:
        """Predicted time until segment `stage` has run a request's `own` samples, whose order key is
        `key` (times the margin; None before the segment's cost is known). The backend slots take
        work earliest key first across every lane, so ahead of it are: the batches running now, and in
        every lane the samples queued with an earlier key (plus `continued`, those of the current
        batch already sent on to `stage`); those of `stage` fill whole batches, and the rest go into
        the batch it joins, with its own samples and the ones queued behind it (up to a batch)."""
        lane = self.segment_lanes[stage]
        cost = self.costs[lane]
        if not cost.known:
            return None
        maximum = self.settings.max_batch_size
        work_ms = 0.0
        for other in self.lanes:
            other_cost = self.costs[other]
            if not other_cost.known:
                continue
            work_ms += other_cost.work_ms(backlog.running[other], maximum)  # running batches: as if just begun
            if other is not lane:
                work_ms += other_cost.work_ms(backlog.before(other, key), maximum)
        ahead = backlog.before(lane, key) + continued
        full_batches, rest = divmod(ahead, maximum)
        work_ms += full_batches * cost.batch_ms(maximum)
        behind = backlog.queued(lane) - backlog.before(lane, key)
        joined = min(maximum, rest + own + behind)
        own_ms = cost.batch_ms(joined) + cost.work_ms(rest + own - maximum, maximum)  # (more than a batch: after)
        return (work_ms / self.settings.workers + own_ms) * self.settings.budget_margin
