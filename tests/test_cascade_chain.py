"""Stage chaining (issue 19): with one backend slot, a batch's samples that go on run the next segment at
once in the same backend thread. Same answers, the scheduler's order kept, nothing lost on failure."""

import asyncio
import time

import numpy as np
import pytest

from common.manifest import read_manifest
from serving.errors import DeadlineExceeded, Unavailable
from serving.policy import RequestOptions, exit_plan, resolve_options
from tests.test_cascade import MIXED, RecordingBackend, make_cascade


@pytest.fixture(scope="module")
def manifest(tiny_repository):
    return read_manifest(tiny_repository)


@pytest.fixture(scope="module")
def images(manifest):
    return np.random.default_rng(1).standard_normal((24, *manifest.input.shape)).astype(np.float32) * 2


def _jobs(manifest, images):
    plan = exit_plan(manifest)
    return [(images[i: i + 3], resolve_options(MIXED[i % len(MIXED)], plan)) for i in range(0, 24, 3)]


@pytest.mark.parametrize("chain", [True, False])
def test_chained_stages_answer_as_the_loop_does(tiny_repository, manifest, images, chain):
    jobs = _jobs(manifest, images)

    async def run(workers, chain_stages, delay_s):
        cascade, backend = make_cascade(tiny_repository, manifest, delay_s=delay_s, workers=workers,
                                        chain_stages=chain_stages)
        await cascade.start()
        results = await asyncio.gather(*(cascade.infer(batch, options) for batch, options in jobs))
        depth = cascade.queue_depth
        await cascade.stop()
        return results, backend.calls, cascade.chained, depth

    expected, _, not_chained, _ = asyncio.run(run(2, False, 0.0))
    got, calls, chained, depth = asyncio.run(run(1, chain, 0.002))
    assert not_chained == 0
    assert (chained > 0) == chain
    assert depth == 0  # the lanes' counters are back to zero
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have.exit_index, want.exit_index)
        np.testing.assert_allclose(have.logits, want.logits, atol=1e-4)
        np.testing.assert_allclose(have.confidence, want.confidence, atol=1e-5)
    assert {stage for stage, _ in calls} == {0, 1, 2}
    assert sum(size for stage, size in calls if stage == 0) == 24  # every sample ran stage 0 once


def test_two_slots_do_not_chain(tiny_repository, manifest, images):
    async def run():
        cascade, _ = make_cascade(tiny_repository, manifest, workers=2)
        await cascade.start()
        full = resolve_options(RequestOptions(policy="full"), exit_plan(manifest))
        await asyncio.gather(*(cascade.infer(images[i: i + 1], full) for i in range(8)))
        await cascade.stop()
        return cascade.chained

    assert asyncio.run(run()) == 0


def test_work_due_earlier_stops_the_chain(tiny_repository, manifest, images):
    """A's stage 0 runs; B, with an earlier deadline than A's order key, queues for stage 0: when A's stage 0
    ends, B's stage 0 runs before A's stage 1, as the scheduler orders them (earliest deadline first)."""
    full = resolve_options(RequestOptions(policy="full"), exit_plan(manifest))

    async def run():
        cascade, backend = make_cascade(tiny_repository, manifest, delay_s=0.05, workers=1)
        await cascade.start()
        first = asyncio.ensure_future(cascade.infer(images[:1], full))
        while not backend.calls:
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(cascade.infer(images[1:3], full, deadline=time.monotonic() + 20))
        await asyncio.gather(first, second)
        await cascade.stop()
        return backend.calls

    calls = asyncio.run(run())
    assert calls[:2] == [(0, 1), (0, 2)], calls


def test_a_request_that_leaves_during_a_chain_runs_no_further_stage(tiny_repository, manifest, images):
    full = resolve_options(RequestOptions(policy="full"), exit_plan(manifest))

    async def run():
        cascade, backend = make_cascade(tiny_repository, manifest, delay_s=0.05, workers=1)
        await cascade.start()
        staying = asyncio.ensure_future(cascade.infer(images[:2], full))
        leaving = asyncio.ensure_future(cascade.infer(images[2:3], full))
        expiring = asyncio.ensure_future(cascade.infer(images[3:4], full, deadline=time.monotonic() + 0.03))
        while not backend.calls:
            await asyncio.sleep(0.001)
        leaving.cancel()  # during the first stage, which runs all three
        kept = await staying
        with pytest.raises(DeadlineExceeded):
            await expiring
        with pytest.raises(asyncio.CancelledError):
            await leaving
        depth = cascade.queue_depth
        await cascade.stop()
        return backend.calls, kept, depth, cascade.chained

    calls, kept, depth, chained = asyncio.run(run())
    assert calls == [(0, 4), (1, 2), (2, 2)], calls
    assert (kept.exit_index == 2).all() and depth == 0 and chained == 2


def test_a_chained_stage_that_fails_fails_its_requests_not_the_cascade(tiny_repository, manifest, images):
    class FailsAtStage1(RecordingBackend):
        def run(self, stage, inputs):
            if stage == 1 and len(inputs) == 3:
                raise RuntimeError("boom")
            return super().run(stage, inputs)

    full = resolve_options(RequestOptions(policy="full"), exit_plan(manifest))

    async def run():
        cascade, recording = make_cascade(tiny_repository, manifest, workers=1)
        backend = cascade.backend = FailsAtStage1(recording.inner)
        await cascade.start()
        with pytest.raises(Unavailable, match="the backend failed"):
            await cascade.infer(images[:3], full)
        ok = await cascade.infer(images[:1], full)
        depth, failed = cascade.queue_depth, cascade.failed_batches
        await cascade.stop()
        return ok, depth, failed, cascade.chained, backend.calls

    ok, depth, failed, chained, calls = asyncio.run(run())
    assert (ok.exit_index == 2).all()
    assert depth == 0 and failed == 1 and chained >= 2
    assert calls[-2:] == [(1, 1), (2, 1)]
