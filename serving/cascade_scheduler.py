"""The cascade's scheduler core, mixed into `Cascade`: one scheduler (`_pump`, run once per event-loop
iteration when something changed) gives each free backend slot the lane whose first request is due first
and takes that lane's batch (`_take_batch`); backend threads run the batches (`_backend_thread`) and hand
each outcome back to the event loop in one call (`_finish_batch`), where every sample leaves at its exit
or continues in the next segment (`_dispatch`, `_dispatch_direct`); a budget request's optional deeper
stages are answered from the exit they passed when time runs out (`_enqueue_optional`, `_give_up`,
`_abandon`, `_answer_fallback`). It uses the state that `Cascade.__init__` makes (queues, counters,
slots, costs) and the request methods of `Cascade` (`_enqueue`, `_expire`, `_fail`)."""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import queue
import threading
import time

import numpy as np

from serving.cascade_lanes import Lane, _Backlog
from serving.cascade_records import OPTIONAL_ORDER_S, _BatchScores, _Group
from serving.errors import GatewayError, Unavailable
from serving.policy import ensemble_step, should_stop

log = logging.getLogger("gateway.cascade")

CONTINUE_ALPHA = 0.05  # weight of a batch in the moving average of the share of samples going on
CORES_CHECK_S = 1.0  # how often a CPU-bound backend's slots are matched to the cores the process may use


def usable_cores() -> int:
    """The cores this process may run on now (its CPU affinity; it can change while it runs)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Scheduler:
    """Mixed into `Cascade` (see the module's docstring)."""

    def _schedule_pump(self) -> None:
        """Run the scheduler once, after what else this event-loop iteration brings."""
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Give every free backend slot a batch: the ready lane whose first request is due first."""
        self._pump_scheduled = False
        now = time.monotonic()
        if self._cpu_bound and now >= self._cores_checked + CORES_CHECK_S:
            self._cores_checked = now
            self.slots = min(self.settings.workers, usable_cores())
        withheld = self.settings.workers - self.slots  # slots left unused (more than the cores)
        wake = math.inf
        while self._free > withheld:
            lane, wake = self._best_lane(now)
            if lane is None:
                break
            groups = self._take_batch(lane, now)
            if groups:
                self._submit(lane, groups)
        # The optional slot, while a worker slot is free (no mandatory work waits for one): the segment whose
        # first optional group is due first.
        while self._optional_free > 0 and self._free > withheld:
            lane = self._best_optional_lane()
            if lane is None:
                break
            groups = self._take_batch(lane, now, self.optional_queues[lane])
            if groups:
                self._submit(lane, groups, optional=True)
        if wake < math.inf and self._free > withheld:  # a deep lane waits for samples upstream: look again then
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
        """A deep segment whose batch is not full waits (bounded) for samples that can reach it soon:
        in a batch running upstream, or queued upstream while another slot is free to run them. Samples
        only queued upstream when this is the last free slot would need this very slot first: waiting
        for them would only hold back the older samples already here (on one core, every deep stage
        waited `max_wait_ms` behind the next first-stage batch)."""
        max_wait = self.settings.max_wait_ms / 1000
        if max_wait <= 0 or lane.direct or lane.position == 0:
            return False
        if self.queued[lane] >= self.settings.max_batch_size or now >= self._waiting_since[lane] + max_wait:
            return False
        another_slot = self._free - (self.settings.workers - self.slots) > 1
        for earlier in self.segment_lanes[:lane.position]:
            queued = self.queued[earlier]
            if self.in_lane[earlier] > queued or (queued and another_slot):
                return True
        return False

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
            history = None  # exit ensembles: the earlier exits' log-probabilities of the batch's samples
            if self.plan.ensembles is not None and not lane.direct and lane.position:
                history = groups[0].history if len(groups) == 1 else np.concatenate([g.history for g in groups],
                                                                                   axis=1)
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
        (self._optional_jobs if optional else self._jobs).put((lane, groups, batch, latest, optional, history))

    def _backend_thread(self, jobs: queue.SimpleQueue, nice: int) -> None:
        """A backend thread: runs batches, hands each outcome back to the event loop in one call."""
        if nice:  # below the event loop: it admits, refuses and answers first
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        while (job := jobs.get()) is not None:
            lane, groups, batch, deadline, optional, history = job
            backend = self.backend if self.backend_ready or self.fallback is None else self.fallback
            started, cpu = time.monotonic(), time.thread_time()
            try:
                kwargs = {}
                if self._timeouts and backend is self.backend and deadline < math.inf:
                    kwargs["timeout_s"] = max(0.001, deadline - started)
                if lane.direct:
                    outcome = backend.run_exit(lane.position, batch, **kwargs), None
                else:
                    logits, features = backend.run(lane.position, batch, **kwargs)
                    if self.plan.ensembles is not None:  # the exit answers as an ensemble (off the event loop)
                        logits, history = ensemble_step(self.plan.ensembles[lane.position], logits, history)
                    outcome = logits, features, history
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
        self.backend_cpu_s += cpu_seconds
        self._settle_timers(groups)
        try:
            if self.metrics:
                self._stage_metrics[lane].observe(size, finished - started, cpu_seconds)
            if isinstance(outcome, BaseException):
                raise outcome
            self._record_run_ms(lane, (finished - started) * 1000)
            self.costs[lane].observe(size, (finished - started) * 1000)
            if lane.direct:
                self._dispatch_direct(lane, groups, outcome[0])
            else:
                self._dispatch(lane, groups, *outcome)
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
            self._model_metrics.backend_error(stage).inc()
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

    def _dispatch(self, lane: Lane, groups: list[_Group], logits: np.ndarray, features: np.ndarray | None,
                  history: np.ndarray | None = None) -> None:
        """Each sample of a segment lane leaves at its exit or continues in the next segment (with its
        exits' log-probabilities, `history`, when the exits answer as ensembles)."""
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
                    next_ms += request.reserve_ms
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
                continuing = _Group(request, samples, request.images[samples] if takes_image else features[rows][go_on],
                                    history=None if history is None else history[:, rows][:, go_on])
            else:  # all continue: the rows themselves, no copy
                continuing = _Group(request, group.samples,
                                    request.images[group.samples] if takes_image else features[rows],
                                    history=None if history is None else history[:, rows])
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
        group.budget_end = request.started + (request.options.budget_ms - request.reserve_ms) / 1000
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
