"""Issue 25, the core, in process: every request answered exactly once whatever fails, deadlines and
cancellation, admission control, deadline-ordered queues and the budget policy. Cascades on the tiny
exported model with the real ONNX Runtime backend, held where a test needs it (`GatedBackend`). No
timing assertions beyond generous bounds. Real gateway processes and a Triton backend that comes and
goes: test_hardening_gateway.py; the robustness run: test_robustness_run.py. The helpers here
(GatedBackend, marked, options, make, until, hold, settled) serve other test modules too."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest

from common.manifest import read_manifest
from serving.backends import OnnxRuntimeBackend
from serving.cascade import Cascade, CascadeSettings, LaneCost, _Backlog, _Group, _Request, default_queue_images
from serving.errors import DeadlineExceeded, Overloaded, Unavailable
from serving.metrics import GatewayMetrics
from serving.policy import RequestOptions, exit_plan, resolve_options


class GatedBackend:
    """The real ONNX Runtime backend, recording every call (lane, batch size, the first value of
    each image, which tests set to tell requests apart) and optionally held at a gate."""

    name = "gated"

    def __init__(self, inner, direct: bool = True) -> None:
        self.inner = inner
        self.has_exit_models = direct
        self.calls: list[tuple[str, int, list[float]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.lock = threading.Lock()
        self.corrupt_marker: float | None = None  # a batch holding this image gets malformed logits
        self.held_lane: str | None = None  # the gate holds only this lane's calls (None: every lane)

    def _record(self, lane, inputs):
        with self.lock:
            self.calls.append((lane, len(inputs), [float(v) for v in inputs[:, 0, 0, 0]]))
        if self.held_lane in (None, lane):
            self.entered.set()
            self.gate.wait(30)

    def run(self, stage, inputs):
        self._record(f"seg{stage}", inputs)
        logits, features = self.inner.run(stage, inputs)
        if self.corrupt_marker is not None and stage == 0 and self.corrupt_marker in inputs[:, 0, 0, 0]:
            return logits[:, 0], features  # one-dimensional logits: the dispatch after the call raises
        return logits, features

    def run_exit(self, index, images):
        self._record(f"exit{index}", images)
        return self.inner.run_exit(index, images)

    def close(self):
        self.inner.close()

    released = 0

    def release_memory(self):
        self.released += 1
        self.inner.release_memory()

    def markers(self) -> set[float]:
        with self.lock:
            return {marker for _, _, values in self.calls for marker in values}


@pytest.fixture(scope="module")
def manifest(tiny_repository):
    return read_manifest(tiny_repository)


def marked(manifest, marker: float, count: int = 1) -> np.ndarray:
    images = np.random.default_rng(int(marker * 10) % 1000).standard_normal((count, *manifest.input.shape))
    images = images.astype(np.float32)
    images[:, 0, 0, 0] = marker
    return images


def options(manifest, **kwargs) -> RequestOptions:
    return resolve_options(RequestOptions(**kwargs), exit_plan(manifest))


def make(tiny_repository, manifest, **settings):
    backend = GatedBackend(OnnxRuntimeBackend(tiny_repository, manifest))
    cascade = Cascade(backend, exit_plan(manifest), CascadeSettings(**settings), GatewayMetrics())
    return cascade, backend


async def until(condition, timeout: float = 20.0) -> None:
    """Poll (on the event loop) until `condition()`; a generous bound, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.005)


async def hold(cascade, backend, manifest):
    """Close the gate and occupy the only backend slot with one request; returns its task."""
    backend.gate.clear()
    backend.entered.clear()
    task = asyncio.create_task(cascade.infer(marked(manifest, 900.0), options(manifest, policy="fixed",
                                                                             exit_depth=3)))
    await until(backend.entered.is_set)
    return task


def settled(cascade) -> bool:
    """Nothing left in any queue or counter once every request is answered."""
    return (cascade.images_in == 0 and cascade.queue_depth == 0 and not cascade.requests
            and all(count == 0 for count in cascade.queued.values()) and cascade._free == cascade.settings.workers)


# -- every request answered exactly once -------------------------------------

def test_an_exception_in_the_dispatch_fails_that_batch_and_nothing_else(tiny_repository, manifest, caplog):
    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1)
        await cascade.start()
        backend.corrupt_marker = 7.0
        good = options(manifest, thresholds=(2.0,))  # never confident: through every stage
        bad = asyncio.create_task(cascade.infer(marked(manifest, 7.0, 3), good))
        with pytest.raises(Unavailable, match="backend failed"):
            await asyncio.wait_for(bad, 20)
        answers = await asyncio.gather(*(cascade.infer(marked(manifest, 8.0 + i, 2), good) for i in range(4)))
        failed_batches, clean = cascade.failed_batches, settled(cascade)
        await cascade.stop()
        return answers, failed_batches, clean, cascade.metrics

    answers, failed_batches, clean, metrics = asyncio.run(run())
    assert failed_batches == 1 and clean
    assert all((answer.exit_index == 2).all() for answer in answers)
    assert metrics.registry.get_sample_value("gateway_backend_errors_total", {"stage": "3"}) == 1
    assert "stage batch failed" in caplog.text  # logged, with the traceback


def test_stop_answers_unfinished_requests_unavailable(tiny_repository, manifest):
    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1)
        await cascade.start()
        blocker = await hold(cascade, backend, manifest)
        waiting = [asyncio.create_task(cascade.infer(marked(manifest, 10.0 + i), options(manifest)))
                   for i in range(3)]
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(cascade.stop(timeout=0.2))
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 20)
        backend.gate.set()
        cut = await asyncio.wait_for(stopping, 20)
        return cut, results, await asyncio.gather(blocker, return_exceptions=True), cascade

    cut, results, blocker, cascade = asyncio.run(run())
    assert cut == 4 and cascade.cut == 4
    assert all(isinstance(result, Unavailable) for result in results + blocker)
    assert cascade.metrics.registry.get_sample_value("gateway_shutdown_cut_requests_total") == 4


# -- deadlines and cancellation ---------------------------------------------

def test_expired_and_cancelled_requests_never_reach_another_backend_call(tiny_repository, manifest):
    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1)
        await cascade.start()
        blocker = await hold(cascade, backend, manifest)
        expiring = asyncio.create_task(cascade.infer(marked(manifest, 20.0, 4), options(manifest),
                                                     deadline=time.monotonic() + 0.05))
        leaving = asyncio.create_task(cascade.infer(marked(manifest, 21.0, 4), options(manifest)))
        staying = asyncio.create_task(cascade.infer(marked(manifest, 22.0, 4), options(manifest)))
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(expiring, 20)
        leaving.cancel()
        await asyncio.sleep(0.01)
        dropped = dict(cascade.dropped)
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, staying), 20)
        clean = settled(cascade)
        await cascade.stop()
        return backend.markers(), dropped, clean, leaving.cancelled()

    markers, dropped, clean, cancelled = asyncio.run(run())
    assert cancelled and clean
    assert 20.0 not in markers and 21.0 not in markers and 22.0 in markers
    assert dropped["expired"] == 4 and dropped["cancelled"] == 4


def test_an_expired_request_leaves_deep_stages_too(tiny_repository, manifest):
    """A request that expires between stages is not carried into the next segment."""
    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1, max_wait_ms=0)
        await cascade.start()
        backend.held_lane, backend.entered = "seg1", threading.Event()
        backend.gate.clear()
        task = asyncio.create_task(cascade.infer(marked(manifest, 30.0, 2), options(manifest, thresholds=(2.0,)),
                                                 deadline=time.monotonic() + 0.3))
        await until(backend.entered.is_set)  # stage 1 is held until the deadline has passed
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(task, 20)
        backend.gate.set()
        await until(lambda: settled(cascade))
        await cascade.stop()
        return [lane for lane, _, _ in backend.calls]

    lanes = asyncio.run(run())
    assert "seg2" not in lanes


# -- admission control --------------------------------------------------------

def test_a_full_cascade_refuses_at_once_with_a_retry_hint(tiny_repository, manifest):
    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1, max_queue_images=6)
        await cascade.start()
        blocker = await hold(cascade, backend, manifest)
        admitted = asyncio.create_task(cascade.infer(marked(manifest, 40.0, 5), options(manifest)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await cascade.infer(marked(manifest, 41.0, 1), options(manifest))
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, admitted), 20)
        after = await cascade.infer(marked(manifest, 42.0, 6), options(manifest))  # an idle cascade admits
        clean = settled(cascade)
        await cascade.stop()
        return refused.value, after, clean

    refused, after, clean = asyncio.run(run())
    assert refused.http_status == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.grpc_code.name == "RESOURCE_EXHAUSTED"
    assert len(after.exit_index) == 6 and clean


def test_an_idle_cascade_gives_memory_back(tiny_repository, manifest):
    """After a burst, once idle, the backend's arenas shrink and the heap is trimmed (RSS itself is
    left to the robustness run)."""
    async def run():
        cascade, backend = make(tiny_repository, manifest)
        await cascade.start()
        await asyncio.gather(*(cascade.infer(marked(manifest, 45.0 + i, 64), options(manifest, policy="full"))
                               for i in range(5)))
        await until(lambda: backend.released == 1)
        await cascade.stop()
        return backend.released

    assert asyncio.run(run()) == 1


def test_the_default_queue_bound_follows_the_profile():
    assert default_queue_images(3.0, 2, 300, 64) == 200  # 300 ms of 3 ms images on 2 slots
    assert default_queue_images(100.0, 1, 300, 64) == 64  # never below a maximum batch
    assert default_queue_images(None, 2, 300, 64) == 4096  # unprofiled


# -- deadline-ordered queues and the budget policy ---------------------------

def test_queues_are_earliest_deadline_first_and_direct_requests_do_not_overtake(tiny_repository, manifest):
    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1, max_batch_size=1)
        await cascade.start()
        blocker = await hold(cascade, backend, manifest)
        now = time.monotonic()
        late = asyncio.create_task(cascade.infer(marked(manifest, 50.0), options(manifest), deadline=now + 20))
        soon = asyncio.create_task(cascade.infer(marked(manifest, 51.0), options(manifest), deadline=now + 5))
        budget = asyncio.create_task(cascade.infer(marked(manifest, 52.0),
                                                   options(manifest, policy="budget", budget_ms=500.0)))
        await asyncio.sleep(0)
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, late, soon, budget), 20)
        first_order = [values[0] for lane, _, values in backend.calls if lane == "seg0"]

        # A cascade request in its deep stages goes before direct requests that arrived after it.
        backend.calls.clear()
        blocker = await hold(cascade, backend, manifest)
        staged = asyncio.create_task(cascade.infer(marked(manifest, 60.0), options(manifest, thresholds=(2.0,))))
        await asyncio.sleep(0)
        direct = [asyncio.create_task(cascade.infer(marked(manifest, 61.0 + i), options(manifest, policy="full")))
                  for i in range(4)]
        await asyncio.sleep(0)
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, staged, *direct), 20)
        await cascade.stop()
        return first_order, [(lane, values[0]) for lane, _, values in backend.calls]

    first_order, second = asyncio.run(run())
    assert first_order == [52.0, 51.0, 50.0]
    lanes = [lane for lane, _ in second]  # (deep segments get activations, not the marked images)
    assert lanes.index("seg2") < lanes.index("exit2") and lanes.count("exit2") == 4
    assert second[lanes.index("seg0")][1] == 60.0


def _line(fixed: float, per_sample: float) -> LaneCost:
    cost = LaneCost()
    for size in (1, 8, 64, 8, 1, 32):  # batches on an exact line: the fit recovers it
        cost.observe(size, fixed + per_sample * size)
    return cost


def test_a_lane_cost_is_the_line_through_its_recent_batches():
    fixed, per_sample = _line(1.0, 0.5).line()
    assert fixed == pytest.approx(1.0) and per_sample == pytest.approx(0.5)
    assert _line(1.0, 0.5).work_ms(20, 8) == pytest.approx(3 * 1.0 + 0.5 * 20)  # three batches
    one_size = LaneCost()
    one_size.observe(4, 6.0)  # one batch size seen: its time per sample, no fixed part
    assert one_size.line() == pytest.approx((0.0, 1.5)) and not LaneCost().known


def test_the_budget_estimate_counts_the_work_ahead_in_deadline_order_and_the_batch_it_joins(
        tiny_repository, manifest):
    """Deterministic: hand-made queues and lane costs, no timing. Two slots, batches of 8, margin 1.1."""
    cascade, _ = make(tiny_repository, manifest, workers=2, max_batch_size=8)
    seg0, seg1, seg2 = cascade.segment_lanes
    exit2 = cascade.direct_lanes[2]
    cascade.costs.update({seg0: _line(1.0, 0.5), seg1: _line(2.0, 1.0), seg2: _line(0.0, 2.0),
                          exit2: _line(0.0, 3.0)})  # the other direct lanes: not yet known, not counted
    opts = options(manifest, policy="budget", budget_ms=100.0)
    for lane, key, count in ((seg0, 1.0, 3), (seg0, 5.0, 4), (seg1, 2.0, 10), (seg1, 6.0, 5), (exit2, 0.5, 2)):
        request = _Request(opts, count, 0.0, None, math.inf, key)
        cascade._enqueue(lane, _Group(request, np.arange(count), None))
    cascade.in_lane[seg2] += 4  # a batch of 4 running in segment 2
    backlog = _Backlog(cascade)
    # Key 3.0, 2 samples, 1 sample of the current batch already sent on: ahead in other lanes seg0's 3
    # (1 + 0.5 x 3), exit2's 2 (3 x 2) and the running 4 (2 x 4); in segment 1, 10 + 1 ahead: one full
    # batch (2 + 8), and 3 go into its batch with its 2 and the 5 behind, capped at 8 (2 + 8).
    work = (2.5 + 6.0 + 8.0 + 10.0) / 2
    assert cascade.next_stage_ms(backlog, 1, 3.0, 2, continued=1) == pytest.approx((work + 10.0) * 1.1)
    # An earlier key goes before segment 1's queue: only what is due before it elsewhere, then its batch.
    assert cascade.next_stage_ms(backlog, 1, 1.5, 2) == pytest.approx(((2.5 + 6.0 + 8.0) / 2 + 10.0) * 1.1)
    # A later key waits for everything; 12 samples behind 15 span its batch (8) and 11 more (two batches).
    later = ((1 + 0.5 * 7) + 6.0 + 8.0 + (2 + 8)) / 2 + (2 + 8) + (2 * 2 + 11)
    assert cascade.next_stage_ms(backlog, 1, 100.0, 12) == pytest.approx(later * 1.1)
    assert make(tiny_repository, manifest)[0].next_stage_ms(backlog, 1, 1.0, 1) is None  # no cost known yet


def test_stage_zero_is_not_run_for_a_request_whose_deeper_stages_end_past_its_deadline(tiny_repository, manifest):
    """Deterministic: hand-made queues, lane costs and continue shares, no backend call. Two slots,
    batches of 8. Segment 1 holds 6 samples due before the requests below and 4 due after; 2 run in
    segment 2."""
    async def run():
        cascade, _ = make(tiny_repository, manifest, workers=2, max_batch_size=8)
        seg0, seg1, seg2 = cascade.segment_lanes
        cascade.costs.update({seg0: _line(1.0, 0.5), seg1: _line(2.0, 1.0), seg2: _line(0.0, 2.0)})
        cascade.run_ms[seg0] = 5.0
        cascade.continue_share[:] = [0.5, 0.5, 0.0]
        loop = asyncio.get_running_loop()
        for key, count in ((0.001, 6), (9.0, 4)):
            cascade._enqueue(seg1, _Group(_Request(options(manifest), count, 0.0, loop.create_future(), math.inf,
                                                   key), np.arange(count), None))
        cascade.in_lane[seg2] += 2

        def request(deadline, count=4, **kwargs):
            return _Request(options(manifest, **kwargs), count, 0.0, loop.create_future(), deadline, deadline)

        # full: segment 1 after its 6 (2 + 6, on two slots) then its 4 (2 + 4); segment 2 after the 2
        # running (4 on two slots) then its 4 (8): 4 + 6 + 2 + 8.
        full = request(5.0, policy="full")
        assert cascade.path_ms(full, 4) == pytest.approx(20.0)
        assert cascade.path_ms(full, 4, upper=True) == pytest.approx(7.0 + 6.0 + 2.0 + 8.0)  # all 10 ahead
        # The bound: all 10 ahead then a full batch (2 + 8) in segment 1; the 2 running then 8 (16) in 2.
        assert cascade.path_bound_ms() == pytest.approx(7.0 + 10.0 + 2.0 + 16.0)
        # confidence: segment 1 if one of 4 goes on (1 - 0.5^4), 2 expected there; segment 2: 1 - 0.75^4, 1.
        confident = request(5.0)
        assert cascade.path_ms(confident, 4) == pytest.approx((1 - 0.5 ** 4) * (4 + 4) + (1 - 0.75 ** 4) * (2 + 2))
        assert cascade.path_ms(request(5.0, policy="fixed", exit_depth=manifest.exit_depths[1]), 4) \
            == pytest.approx(10.0)
        assert cascade.path_ms(request(5.0, policy="fixed", exit_depth=manifest.exit_depths[0]), 4) == 0.0
        assert cascade.path_ms(request(5.0, policy="budget", budget_ms=10.0), 4) == 0.0

        # Taking stage 0 at time 0 (its batches take 5 ms): 15 ms left after it is too little for the
        # full path (20 ms), 30 ms is enough; a request without a deadline is always taken.
        short, roomy, endless = request(0.020, policy="full"), request(0.035, policy="full"), request(math.inf)
        endless.key = 50.0
        for item in (short, roomy, endless):
            cascade._enqueue(seg0, _Group(item, np.arange(4), np.zeros((4, *manifest.input.shape), np.float32)))
        taken = [group.request for group in cascade._take_batch(seg0, 0.0)]
        return taken, short, roomy, endless, dict(cascade.dropped)

    taken, short, roomy, endless, dropped = asyncio.run(run())
    assert taken == [roomy, endless]
    assert isinstance(short.future.exception(), DeadlineExceeded) and dropped["expired"] == 4


def test_the_share_of_samples_going_on_follows_what_the_requests_do(tiny_repository, manifest):
    """Non-budget requests move each segment's share of samples going on (0 before any was seen); those
    of budget requests (optional deeper work) do not."""
    async def run():
        cascade, _ = make(tiny_repository, manifest, workers=1)
        await cascade.start()
        before = list(cascade.continue_share)
        await cascade.infer(marked(manifest, 70.0, 4), options(manifest, policy="budget", budget_ms=10_000.0))
        after_budget = list(cascade.continue_share)
        await cascade.infer(marked(manifest, 71.0, 4), options(manifest, thresholds=(2.0,)))  # all go on
        after = list(cascade.continue_share)
        await cascade.stop()
        return before, after_budget, after

    before, after_budget, after = asyncio.run(run())
    assert before == after_budget == [0.0] * len(before)
    assert all(0.0 < share <= 1.0 for share in after[:-1]) and after[-1] == 0.0


def test_a_request_past_its_budget_stops_at_the_first_exit(tiny_repository, manifest):
    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1)
        await cascade.start()
        result = await cascade.infer(marked(manifest, 70.0, 3),
                                     options(manifest, policy="budget", budget_ms=0.001, thresholds=(2.0,)))
        await cascade.stop()
        return result, [lane for lane, _, _ in backend.calls]

    result, lanes = asyncio.run(run())
    assert (result.exit_index == 0).all() and lanes == ["seg0"]
