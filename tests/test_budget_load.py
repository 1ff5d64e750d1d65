"""Issue 25, the budget policy under load: a budget request's optional deeper stages run on a backend
thread of their own (lower priority), so they never hold a slot that a first stage needs, and a request
whose optional batch has not ended by its budget's end (less the reserve) is answered from the exit it
passed at that moment, the batch's rows ignored. In-process cascades on the tiny exported model with the
real ONNX Runtime backend; no timing assertions (the gates hold calls far longer than any bound used)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from common.manifest import read_manifest
from serving.backends import OnnxRuntimeBackend
from serving.cascade import Cascade, CascadeSettings, _Backlog, _Group, _Request
from serving.metrics import GatewayMetrics
from serving.policy import exit_plan

from .test_hardening_core import GatedBackend, marked, options, settled, until


class ThreadGatedBackend(GatedBackend):
    """Records which thread ran each call, at which nice value; the gate holds only one thread's calls."""

    def __init__(self, inner, held_thread: str, held_marker: float | None = None) -> None:
        super().__init__(inner)
        self.held_thread, self.held_marker = held_thread, held_marker  # (a marker: only its first-stage call)
        self.threads: list[tuple[str, str, int]] = []  # (lane, thread name, its nice value)

    def _record(self, lane, inputs):
        name = threading.current_thread().name
        markers = [float(v) for v in inputs[:, 0, 0, 0]]
        with self.lock:
            self.calls.append((lane, len(inputs), markers))
            self.threads.append((lane, name, os.getpriority(os.PRIO_PROCESS, 0)))
        if name == self.held_thread and (self.held_marker is None or self.held_marker in markers) \
                and self.held_lane in (None, lane):
            self.entered.set()
            self.gate.wait(30)


def make(tiny_repository, manifest, held_thread="stage_optional", held_marker=None, **settings):
    backend = ThreadGatedBackend(OnnxRuntimeBackend(tiny_repository, manifest), held_thread, held_marker)
    cascade = Cascade(backend, exit_plan(manifest), CascadeSettings(**settings), GatewayMetrics())
    return cascade, backend


def test_optional_stages_run_on_their_own_lower_priority_thread_and_never_hold_a_first_stage(tiny_repository):
    """One worker slot. The budget request's deeper stage is held on the optional thread; a mandatory
    request meanwhile runs its whole cascade on the worker slot and is answered; released, the budget
    request still completes its optional stages (on that thread) and answers from the deepest exit."""
    manifest = read_manifest(tiny_repository)
    base = os.getpriority(os.PRIO_PROCESS, 0)

    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1, backend_nice=min(base + 5, 19),
                                optional_nice=19)
        await cascade.start(marked(manifest, 1.0))  # the warm-up seeds every stage's cost
        backend.calls.clear()
        backend.threads.clear()
        backend.gate.clear()
        budget = asyncio.create_task(cascade.infer(marked(manifest, 80.0, 2), options(
            manifest, policy="budget", budget_ms=30_000.0, thresholds=(2.0,))))
        await until(backend.entered.is_set)  # its second stage holds the optional thread
        mandatory = await asyncio.wait_for(cascade.infer(marked(manifest, 81.0, 2),
                                                         options(manifest, thresholds=(2.0,))), 20)
        pending = not budget.done()
        backend.gate.set()
        answer = await asyncio.wait_for(budget, 20)
        await until(lambda: settled(cascade) and cascade._optional_free == 1)
        await cascade.stop()
        return mandatory, pending, answer, list(backend.threads), cascade.gave_up

    mandatory, pending, answer, threads, gave_up = asyncio.run(run())
    assert pending and (mandatory.exit_index == 2).all()  # answered while the optional stage was held
    assert (answer.exit_index == 2).all() and gave_up == 0
    by_thread = {}
    for lane, name, nice in threads:
        by_thread.setdefault(name, []).append((lane, nice))
    assert [lane for lane, _ in by_thread["stage_optional"]] == ["seg1", "seg2"]  # the budget request's
    assert [lane for lane, _ in by_thread["stage_0"]] == ["seg0", "seg0", "seg1", "seg2"]  # both first stages
    assert {nice for _, nice in by_thread["stage_optional"]} == {19}
    assert {nice for _, nice in by_thread["stage_0"]} == {min(base + 5, 19)}


def test_the_optional_thread_starts_a_batch_only_while_a_worker_slot_is_free(tiny_repository):
    """One worker slot, held by a mandatory request's first stage: the budget request's deeper stage,
    queued meanwhile, does not start (its CPU would slow the mandatory work); it runs once no mandatory
    work holds the slot, after the mandatory request's whole cascade here, and still answers from the
    deepest exit."""
    manifest = read_manifest(tiny_repository)

    async def run():
        cascade, backend = make(tiny_repository, manifest, held_thread="stage_0", held_marker=81.0, workers=1,
                                max_batch_size=1, max_wait_ms=0.0, optional_nice=0)
        await cascade.start(marked(manifest, 1.0))
        backend.calls.clear()
        backend.threads.clear()
        backend.gate.clear()
        budget = asyncio.create_task(cascade.infer(marked(manifest, 80.0), options(
            manifest, policy="budget", budget_ms=30_000.0, thresholds=(2.0,))))
        await asyncio.sleep(0)
        mandatory = asyncio.create_task(cascade.infer(marked(manifest, 81.0), options(manifest, thresholds=(2.0,)),
                                                      deadline=time.monotonic() + 60))
        await until(backend.entered.is_set)  # the mandatory request's first stage holds the worker slot
        queued = sum(len(heap) for heap in cascade.optional_queues.values())
        while_held = [lane for lane, _, _ in backend.calls]
        backend.gate.set()
        answers = await asyncio.wait_for(asyncio.gather(budget, mandatory), 20)
        await until(lambda: settled(cascade) and cascade._optional_free == 1)
        await cascade.stop()
        return answers, queued, while_held, [(lane, name) for lane, name, _ in backend.threads]

    (budget, mandatory), queued, while_held, calls = asyncio.run(run())
    assert queued == 1 and while_held == ["seg0", "seg0"]  # its seg1 waits, not started
    assert calls == [("seg0", "stage_0"), ("seg0", "stage_0"), ("seg1", "stage_0"), ("seg2", "stage_0"),
                     ("seg1", "stage_optional"), ("seg2", "stage_optional")], calls
    assert (budget.exit_index == 2).all() and (mandatory.exit_index == 2).all()


@pytest.mark.parametrize("optional_nice", [0, None], ids=["optional-thread", "shared-slots"])
def test_an_optional_batch_still_running_at_the_budget_end_answers_from_the_exit_it_passed(tiny_repository,
                                                                                           optional_nice):
    """Its optional stage started in time but is still running when the budget (less the reserve) ends:
    the request is answered then, from the exit it passed (those logits, that exit); when the batch ends
    its rows are ignored (no deeper stage runs for it) and every counter settles. On the optional thread
    or, without one, on a worker slot."""
    manifest = read_manifest(tiny_repository)
    images = marked(manifest, 90.0)

    async def run():
        cascade, backend = make(tiny_repository, manifest, "stage_optional" if optional_nice is not None
                                else "stage_0", workers=1, optional_nice=optional_nice)
        backend.held_lane = "seg1"
        await cascade.start(marked(manifest, 1.0))
        backend.calls.clear()
        backend.gate.clear()
        answer = await asyncio.wait_for(cascade.infer(images, options(manifest, policy="budget", budget_ms=300.0,
                                                                      thresholds=(2.0,))), 20)
        held = backend.entered.is_set() and not backend.gate.is_set()  # answered while its batch was held
        backend.gate.set()
        await until(lambda: settled(cascade) and cascade._optional_free == (optional_nice is not None))
        await cascade.stop()
        return answer, held, [lane for lane, _, _ in backend.calls], cascade.gave_up, cascade.abandoned

    answer, held, lanes, gave_up, abandoned = asyncio.run(run())
    expected = OnnxRuntimeBackend(tiny_repository, manifest).run(0, images)[0]
    assert held and (answer.exit_index == 0).all() and np.allclose(answer.logits, expected, atol=1e-5)
    assert lanes == ["seg0", "seg1"] and gave_up == 1 and abandoned == 1


def test_without_an_optional_thread_optional_groups_share_the_worker_queues(tiny_repository):
    """optional_nice=None keeps the former arrangement: optional groups in the segment's own queue
    (after its mandatory work), and the budget estimate sees optional groups in either place."""
    manifest = read_manifest(tiny_repository)
    opts = options(manifest, policy="budget", budget_ms=100.0)
    for optional_nice, separate in ((None, False), (19, True)):
        cascade = Cascade(ThreadGatedBackend(OnnxRuntimeBackend(tiny_repository, manifest), ""),
                          exit_plan(manifest), CascadeSettings(optional_nice=optional_nice), GatewayMetrics())
        seg1 = cascade.segment_lanes[1]
        group = _Group(_Request(opts, 3, 0.0, None, float("inf"), 1.0), np.arange(3), None)
        group.fallback = (0, None, None)
        cascade._enqueue(seg1, group, 7.0)
        assert (len(cascade.optional_queues[seg1]), len(cascade.queues[seg1])) == ((1, 0) if separate else (0, 1))
        backlog = _Backlog(cascade)
        assert backlog.before(seg1, 8.0) == 3 and backlog.before(seg1, 6.0) == 0


# -- the front end's queue in the reserve ---------------------------------------

def test_the_reserve_counts_the_front_ends_queue(tiny_repository):
    """A budget request keeps its share of the budget plus, per request in flight (at least as many as
    the last window's most), the front end's moving CPU per request (on a busy gateway its transport and
    answer wait behind theirs); never more than the budget. With that queue as long as the budget, a
    request that would go to the deepest exit with time to spare answers from its first exit; with none,
    from the deepest."""
    manifest = read_manifest(tiny_repository)

    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1, budget_reserve=0.2)
        await cascade.start(marked(manifest, 1.0))
        backend.gate.set()
        reserves = {}
        cascade.front_end_ms = 2.0
        for in_flight in (0, 10, 100):
            cascade.requests = {object() for _ in range(in_flight)}
            reserves[in_flight] = cascade.budget_reserve_ms(100.0)
        cascade.requests = set()
        cascade.in_flight_peak = 10  # as many in the last window: they count while the cascade holds fewer
        reserves["peak"] = cascade.budget_reserve_ms(100.0)
        cascade.in_flight_peak = 0
        never_stop = options(manifest, policy="budget", budget_ms=30_000.0, thresholds=(2.0,))
        cascade.front_end_ms = 0.0
        deepest = await asyncio.wait_for(cascade.infer(marked(manifest, 2.0, 2), never_stop), 20)
        cascade.front_end_ms = 30_000.0  # one request in flight (itself): the whole budget is kept
        first = await asyncio.wait_for(cascade.infer(marked(manifest, 3.0, 2), never_stop), 20)
        await until(lambda: settled(cascade))
        await cascade.stop()
        return reserves, deepest, first

    reserves, deepest, first = asyncio.run(run())
    assert reserves == {0: 20.0, 10: 40.0, 100: 100.0, "peak": 40.0}
    assert (deepest.exit_index == len(manifest.exits) - 1).all() and (first.exit_index == 0).all()


def test_the_front_end_cost_is_process_cpu_outside_backend_calls_per_request(tiny_repository, monkeypatch):
    """Each measurement: (process CPU - backend CPU) / requests answered since the last one, in ms,
    into a moving figure (the first taken as it is); a window with too few requests goes on; an idle
    cascade starts a new window (idle CPU is no request's)."""
    from serving import cascade_estimates

    manifest = read_manifest(tiny_repository)
    clock = [10.0]
    monkeypatch.setattr(cascade_estimates, "process_cpu_s", lambda: clock[0])
    cascade, _ = make(tiny_repository, manifest)
    cascade.requests = {object()}  # requests keep coming (no loop: the tick does not reschedule)
    cascade._watch_front_end = lambda: None
    steps = [(0.0, 0.0, 0), (0.5, 0.1, 100), (0.2, 0.0, 10), (0.3, 0.1, 50)]  # (CPU, backend CPU, answered)
    seen = []
    for cpu, backend, answered in steps:
        clock[0] += cpu
        cascade.backend_cpu_s += backend
        cascade.completed += answered
        cascade._front_end_tick()
        seen.append(round(cascade.front_end_ms, 6))
    # 1st: the window opens; 2nd: (0.5 - 0.1) / 100 = 4 ms; 3rd: 10 requests, the window goes on;
    # 4th: (0.2 + 0.3 - 0.1) / 60 = 6.667 ms, moved 0.3 of the way from 4
    assert seen == [0.0, 4.0, 4.0, round(4.0 + cascade_estimates.FRONT_END_ALPHA * (0.4 / 60 * 1000 - 4.0), 6)]
    cascade._in_flight_window = 7  # the most requests in flight seen since the last tick
    cascade._front_end_tick()
    assert (cascade.in_flight_peak, cascade._in_flight_window) == (7, 1)  # the next window starts with those now
    cascade.requests = set()
    cascade._front_end_tick()
    assert cascade._front_end_mark is None
