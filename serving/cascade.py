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
batch is not full may wait up to `max_wait_ms` for samples that can reach it (running
upstream, or queued upstream while another slot is free).

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
  within its budget less a reserve (a share of the budget plus the front end's
  queue, `budget_reserve_ms`; `next_stage_ms`: each lane's batch time as a
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

Backend calls run on `workers` threads (a CPU-bound backend uses at most one per core the process may
use, `slots`); decisions and bookkeeping run on the
event loop. The per-request and per-stage cost is kept small (issue 19): one
hand-off to a backend thread per batch (a queue put) and one call back to the
event loop per batch (`call_soon_threadsafe`), no task or future per batch; one
float32 softmax per batch; a request answered by one batch keeps that batch's rows.

This module owns the `Cascade` (its state, life cycle, admission of requests and their queues) and its
settings; the rest lives beside it and is mixed in or imported (every name stays importable from here):
`cascade_records` (requests, groups, results), `cascade_lanes` (lanes and their cost model),
`cascade_admission` (queue bound, refusals, draining), `cascade_scheduler` (the scheduler core:
batches, backend threads, dispatch) and `cascade_estimates` (time estimates for the budget policy).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from serving import heap
from serving.backends import StageBackend
from serving.cascade_admission import _Admission, default_queue_images, until_quiet
from serving.cascade_estimates import _BudgetEstimates
from serving.cascade_lanes import Lane, LaneCost, _Backlog
from serving.cascade_records import NO_DEADLINE_ORDER_S, OPTIONAL_ORDER_S, CascadeResult, _BatchScores, _Group, _Request
from serving.cascade_scheduler import CONTINUE_ALPHA, _Scheduler, usable_cores
from serving.errors import DeadlineExceeded, Unavailable
from serving.metrics import GatewayMetrics
from serving.policy import ExitPlan, RequestOptions

# Every name that other modules and tests import from here, wherever it lives now.
__all__ = ["CONTINUE_ALPHA", "NO_DEADLINE_ORDER_S", "OPTIONAL_ORDER_S", "TRIM_AFTER_IDLE_S",
           "TRIM_AFTER_IMAGES", "Cascade", "CascadeResult", "CascadeSettings", "Lane", "LaneCost", "_Backlog",
           "_BatchScores", "_Group", "_Request", "default_queue_images", "until_quiet"]

log = logging.getLogger("gateway.cascade")
TRIM_AFTER_IDLE_S = 1.0  # an idle cascade gives freed heap memory back to the system after this
TRIM_AFTER_IMAGES = 256  # ... when at least this many images went through since the last time


@dataclass(frozen=True)
class CascadeSettings:
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    workers: int = 2
    budget_margin: float = 1.1  # predicted stage time is multiplied by this for the budget policy
    # Share of a budget kept for what the cascade does not see (transport, the client, the load that a
    # deeper stage adds to everyone's queue), on top of the front end's queue (`budget_reserve_ms`): a
    # request continues only if it would finish before the rest.
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


class Cascade(_Scheduler, _BudgetEstimates, _Admission):
    """The gateway's cascade over one backend (and its fallback): `start`, `infer`, `stop`."""

    def __init__(self, backend: StageBackend, plan: ExitPlan, settings: CascadeSettings,
                 metrics: GatewayMetrics | None = None, profiled_ms: list[float | None] | None = None,
                 fallback: StageBackend | None = None, model: str = "") -> None:
        self.backend, self.plan, self.settings, self.metrics = backend, plan, settings, metrics
        self.model = model  # the name its metrics carry (their `model` label)
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
        self.completed = 0  # requests answered or failed, ever
        self.backend_cpu_s = 0.0  # CPU time of the backend threads inside backend calls, ever
        self.front_end_ms = 0.0  # moving CPU per request outside backend calls (0: not measured yet)
        self._front_end_mark: tuple[float, float, int] | None = None
        self._front_end_timer: asyncio.TimerHandle | None = None
        self.in_flight_peak = 0  # the most requests in flight during the last front-end window
        self._in_flight_window = 0  # ... during this one so far
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
            self._model_metrics = metrics.model(model)
            self._stage_metrics = {lane: self._model_metrics.stage(f"{plan.depths[lane.position]}-direct"
                                                                   if lane.direct else str(plan.depths[lane.position]))
                                   for lane in self.lanes}
            self._exit_counters = [self._model_metrics.exit(depth) for depth in plan.depths]
            self._model_metrics.read_queue_depth(lambda: self.queue_depth)  # read when scraped
            metrics.admitted_images.set_function(lambda: self.images_in)
            metrics.backend_ready.set_function(lambda: float(self.backend_ready))
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # batches for the backend threads; None stops one
        self._optional_jobs: queue.SimpleQueue = queue.SimpleQueue()  # batches for the optional slot's thread
        self._optional_free = 0 if settings.optional_nice is None else 1  # the optional slot, when free
        self.abandoned = 0  # samples answered from their fallback while their optional batch ran
        self._threads: list[threading.Thread] = []
        self._sequence = itertools.count()
        self._free = settings.workers  # backend slots not running a batch
        # A CPU-bound backend (ONNX Runtime on the CPU, one intra-op thread a call) runs at most one batch per
        # core the process may use: more calls at once on the same cores only time-slice (each slower, caches
        # thrashed, and smaller batches). `slots` of the `workers` slots are used, re-read every CORES_CHECK_S.
        self._cpu_bound = bool(getattr(backend, "cpu_bound", False))
        self.slots = min(settings.workers, usable_cores()) if self._cpu_bound else settings.workers
        self._cores_checked = time.monotonic()
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
                self._model_metrics.shutdown_cut.inc(len(unfinished))
            log.error("shutdown: requests not finished within the grace period answered UNAVAILABLE",
                      extra={"fields": {"requests": len(unfinished), "grace_s": timeout,
                                        "images": sum(request.size for request in unfinished)}})
            for request in unfinished:
                self._fail(request, Unavailable("the gateway shut down before this request finished"), "failed")
            await asyncio.sleep(0)  # their handlers answer before the workers go
        await until_quiet(self)
        if self._health_task is not None:
            self._health_task.cancel()
        for timer in (self._wait_timer, self._trim_timer, self._front_end_timer):
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

    # -- requests -----------------------------------------------------------
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
        self._in_flight_window = max(self._in_flight_window, len(self.requests))
        self._watch_front_end()
        if options.budget_ms is not None:
            request.reserve_ms = self.budget_reserve_ms(options.budget_ms)
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
            self.completed += 1
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
        heap.trim()  # the arenas of the backend threads keep what bursts of requests freed, otherwise

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
                self._model_metrics.dropped(reason).inc(dropped)
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

