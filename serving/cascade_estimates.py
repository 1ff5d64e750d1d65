"""The cascade's time estimates for the budget policy and the deadline checks, mixed into `Cascade`:
each lane's moving batch time (`_record_run_ms`), the predicted time of a request's deeper stages
(`path_ms`, bounded by `path_bound_ms`; `_ahead`) and of the next segment for a budget request
(`next_stage_ms`, from a `_Backlog`), and the share of a budget kept for what the cascade does not see
(`budget_reserve_ms`, from the moving front-end CPU per request, `_front_end_tick`). Reads the state that
`Cascade.__init__` makes."""

from __future__ import annotations

import time

from serving.cascade_lanes import Lane, _Backlog
from serving.cascade_records import _Request

FRONT_END_PERIOD_S = 0.5  # how often the front end's CPU per request is measured while requests come
FRONT_END_MIN_REQUESTS = 50  # requests a measurement needs (fewer: the window goes on)
FRONT_END_ALPHA = 0.3  # weight of a new measurement in the moving figure
process_cpu_s = time.process_time  # the whole process's CPU time (every thread)


class _BudgetEstimates:
    """Mixed into `Cascade` (see the module's docstring)."""

    def budget_reserve_ms(self, budget_ms: float) -> float:
        """What a budget request admitted now keeps of its budget for what the cascade does not see: a
        share of the budget (`budget_reserve`), plus the front end's queue: on a busy gateway the request's
        transport, parsing and answer wait behind those of every request in flight, each costing the moving
        CPU per request outside backend calls (`front_end_ms`). Requests in flight: at least the most seen
        in the last measurement window (under a steady load, those between the transport and the cascade
        are requests too). At most the whole budget."""
        queue_ms = max(len(self.requests), self.in_flight_peak) * self.front_end_ms
        return min(budget_ms, self.settings.budget_reserve * budget_ms + queue_ms)

    def _front_end_tick(self) -> None:
        """Every FRONT_END_PERIOD_S while requests come: the process's CPU outside backend calls per
        request answered since the last measurement, into the moving `front_end_ms`."""
        self._front_end_timer = None
        self.in_flight_peak, self._in_flight_window = self._in_flight_window, len(self.requests)
        mark = (process_cpu_s(), self.backend_cpu_s, self.completed)
        if self._front_end_mark is None:
            self._front_end_mark = mark
        else:
            cpu, backend, done = (now - then for now, then in zip(mark, self._front_end_mark))
            if done >= FRONT_END_MIN_REQUESTS:
                sample = max(0.0, cpu - backend) / done * 1000
                first = self.front_end_ms == 0.0
                self.front_end_ms = sample if first else self.front_end_ms + FRONT_END_ALPHA * (
                    sample - self.front_end_ms)
                self._front_end_mark = mark
        if self.requests:
            self._watch_front_end()
        else:  # idle: the next burst starts a new window (idle CPU counts for no request)
            self._front_end_mark = None

    def _watch_front_end(self) -> None:
        if self._front_end_timer is None and self._loop is not None:
            self._front_end_timer = self._loop.call_later(FRONT_END_PERIOD_S, self._front_end_tick)

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
                total += cost.work_ms(self.in_lane[lane], maximum) / self.slots + cost.batch_ms(maximum)
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
        maximum, workers = self.settings.max_batch_size, self.slots
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
        return (work_ms / self.slots + own_ms) * self.settings.budget_margin
