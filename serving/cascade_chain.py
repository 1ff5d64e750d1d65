"""Stage chaining, mixed into `Cascade` (issue 19): with one backend slot, a batch's samples that go on
run the next segment at once in the same backend thread, instead of a round trip through the event loop
per stage (post the outcome, wake the loop, dispatch, queue, schedule, hand the next batch back).

With one slot nothing else could join a deep stage's batch meanwhile (on one core each deep batch was
the continuation of one first-stage batch anyway), so chaining loses no batching; it saves the round
trips and runs the next segment while the activations are still in the cache. The backend thread
decides which samples stop (`_chain_step`: the exit policies are pure functions of the scores and the
request's options) and posts each stage's answers to the event loop (`_apply_chained`), which answers
them, counts them, and keeps the lanes' counters right. A chain stops, and the normal path
(`_finish_batch`: queue the samples that go on, let the scheduler choose) takes over, at the last stage,
when a batch holds a budget request (its decision needs the queues' state), or when work queued
anywhere is due before the batch's own samples (earliest deadline first, as the scheduler would)."""

from __future__ import annotations

import time

import numpy as np

from serving.cascade_lanes import Lane
from serving.cascade_records import _BatchScores, _Group
from serving.cascade_scheduler import CONTINUE_ALPHA
from serving.policy import should_stop


class _Chain:
    """Mixed into `Cascade` (see the module's docstring)."""

    def _chains(self, lane: Lane, optional: bool) -> bool:
        """(Event loop, when a batch is handed to a backend thread) may its continuation run at once?"""
        return (self.settings.chain_stages and self.slots == 1 and not optional and not lane.direct
                and lane.position < self.stages - 1)

    def _due_before(self, key: float) -> bool:
        """(Backend thread) is live work queued in some lane due before `key`? The heaps belong to the
        event loop; their first entries are only read here (a race costs one chained stage at most)."""
        for heap in self._heaps:
            try:
                first_key, _, group = heap[0]
            except IndexError:
                continue
            if first_key < key and group.live:
                return True
        return False

    def _chain_step(self, lane: Lane, groups: list[_Group], outcome) -> tuple | None:
        """(Backend thread) a segment batch's outcome decided here: (the groups that go on, their batch,
        the decisions for `_apply_chained`), or None to hand the outcome to the event loop instead."""
        stage = lane.position
        if stage >= self.stages - 1 or any(group.request.options.policy == "budget" for group in groups):
            return None
        if self._due_before(min(group.request.key for group in groups)):
            return None
        logits, features = outcome
        now = time.monotonic()
        batch_scores = _BatchScores(logits)
        takes_image = stage + 1 in self.image_stages
        answers, expired, going = [], [], []  # going: (request, samples, rows) that run the next segment
        keep = np.zeros(len(logits), dtype=bool)
        offset = mandatory = stopped = 0
        for group in groups:
            count = len(group.samples)
            rows = slice(offset, offset + count)
            offset += count
            request = group.request
            if request.future.done():  # expired, cancelled or failed meanwhile (read only: a race costs a stage)
                continue
            if request.deadline <= now:
                expired.append(request)
                continue
            scores = batch_scores(request.options.score)[rows]
            stop = should_stop(stage, scores, request.options, self.plan)
            stopping = int(np.count_nonzero(stop))
            mandatory += count
            stopped += stopping
            if stopping == count:
                answers.append((request, group.samples, logits[rows], scores))
                continue
            if stopping:
                answers.append((request, group.samples[stop], logits[rows][stop], scores[stop]))
                go = ~stop
                keep[rows] = go
                going.append((request, group.samples[go]))
            else:
                keep[rows] = True
                going.append((request, group.samples))
        decided = (answers, expired, mandatory, stopped)
        if not going:
            return [], None, decided
        if takes_image:
            parts = [request.images[samples] for request, samples in going]
            batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        else:
            batch = features[keep] if not keep.all() else features
        next_lane, next_groups, start = self.segment_lanes[stage + 1], [], 0
        for request, samples in going:
            group = _Group(request, samples, batch[start:start + len(samples)])
            group.lane = next_lane
            next_groups.append(group)
            start += len(samples)
        return next_groups, batch, decided

    def _apply_chained(self, lane: Lane, groups: list[_Group], size: int, decided: tuple, going: int,
                       started: float, finished: float, cpu_seconds: float, last: bool) -> None:
        """(Event loop) a chained stage's decisions: its answers and expiries, the counters (`going`
        samples run the next segment in the same thread), and the slot back if the chain ended."""
        answers, expired, mandatory, stopped = decided
        if last:
            self._free += 1
        self.in_lane[lane] -= size
        if going:
            self.in_lane[self.segment_lanes[lane.position + 1]] += going
            self.chained += 1
        try:
            if self.metrics:
                self._stage_metrics[lane].observe(size, finished - started, cpu_seconds)
            self._record_run_ms(lane, (finished - started) * 1000)
            self.costs[lane].observe(size, (finished - started) * 1000)
            for request in expired:
                self._expire(request)
            answered = 0
            for request, samples, logits, scores in answers:
                if not request.future.done():
                    request.answer(samples, logits, lane.position, scores)
                    answered += len(samples)
            if mandatory:
                share = 1.0 - stopped / mandatory
                self.continue_share[lane.position] += CONTINUE_ALPHA * (share - self.continue_share[lane.position])
            if self.metrics and answered:
                self._exit_counters[lane.position].inc(answered)
        except Exception as error:
            self._batch_failed(lane, groups, error)
        finally:
            if last:
                self._schedule_pump()
