"""The cascade's time estimates for the budget policy and the deadline checks, mixed into `Cascade`:
each lane's moving batch time (`_record_run_ms`), the predicted time of a request's deeper stages
(`path_ms`, bounded by `path_bound_ms`; `_ahead`) and of the next segment for a budget request
(`next_stage_ms`, from a `_Backlog`). Reads the state that `Cascade.__init__` makes."""

from __future__ import annotations

from serving.cascade_lanes import Lane, _Backlog
from serving.cascade_records import _Request


class _BudgetEstimates:
    """Mixed into `Cascade` (see the module's docstring)."""

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
