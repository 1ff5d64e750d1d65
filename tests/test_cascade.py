"""The cascade on a tiny exported model with the real ONNX Runtime backend."""

import asyncio
import threading
import time

import numpy as np
import pytest

from common.manifest import read_manifest
from serving.backends import OnnxRuntimeBackend
from serving.cascade import Cascade, CascadeSettings
from serving.errors import Unavailable
from serving.metrics import GatewayMetrics
from serving.policy import RequestOptions, exit_plan, resolve_options


class RecordingBackend:
    """The real ONNX Runtime backend, slowed a little and recording batch sizes."""

    name = "recording"

    def __init__(self, inner, delay_s: float = 0.0, direct: bool = False) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.has_exit_models = direct
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def run(self, stage, inputs):
        with self.lock:
            self.calls.append((stage, len(inputs)))
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner.run(stage, inputs)

    def run_exit(self, index, images):
        with self.lock:
            self.calls.append((f"exit{index}", len(images)))
        return self.inner.run_exit(index, images)

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def manifest(tiny_repository):
    return read_manifest(tiny_repository)


@pytest.fixture(scope="module")
def images(manifest):
    rng = np.random.default_rng(0)
    return rng.standard_normal((24, *manifest.input.shape)).astype(np.float32) * 2


def make_cascade(repository, manifest, delay_s=0.0, direct=False, **settings):
    backend = RecordingBackend(OnnxRuntimeBackend(repository, manifest), delay_s, direct)
    cascade = Cascade(backend, exit_plan(manifest), CascadeSettings(**settings), GatewayMetrics())
    return cascade, backend


MIXED = [
    RequestOptions(),
    RequestOptions(thresholds=(0.4,)),
    RequestOptions(thresholds=(0.0,)),
    RequestOptions(policy="full"),
    RequestOptions(policy="fixed", exit_depth=5),
    RequestOptions(score="margin", thresholds=(0.1, 0.3, 0.0)),
    RequestOptions(score="entropy", thresholds=(0.05,)),
]


def test_concurrent_mixed_requests_get_the_answers_each_sample_gets_alone(tiny_repository, manifest, images):
    plan = exit_plan(manifest)
    jobs = [(images[i: i + 3], resolve_options(MIXED[i % len(MIXED)], plan)) for i in range(0, 24, 3)]

    async def alone():
        cascade, _ = make_cascade(tiny_repository, manifest, max_wait_ms=0)
        await cascade.start()
        results = []
        for batch, options in jobs:
            per_sample = [await cascade.infer(batch[j: j + 1], options) for j in range(len(batch))]
            results.append(per_sample)
        await cascade.stop()
        return results

    async def together():
        cascade, backend = make_cascade(tiny_repository, manifest, delay_s=0.002, max_wait_ms=5)
        await cascade.start()
        results = await asyncio.gather(*(cascade.infer(batch, options) for batch, options in jobs))
        await cascade.stop()
        return results, backend

    expected = asyncio.run(alone())
    got, backend = asyncio.run(together())
    exits_seen = set()
    for per_sample, result in zip(expected, got):
        for j, single in enumerate(per_sample):
            assert result.exit_index[j] == single.exit_index[0]
            np.testing.assert_allclose(result.logits[j], single.logits[0], atol=1e-4)
            np.testing.assert_allclose(result.confidence[j], single.confidence[0], atol=1e-5)
            exits_seen.add(int(single.exit_index[0]))
    assert exits_seen == {0, 1, 2}  # the mix really exercises every exit
    assert max(size for stage, size in backend.calls if stage == 0) > 3  # requests were batched together


def test_deep_stages_are_rebatched_under_concurrency(tiny_repository, manifest, images):
    async def run():
        cascade, backend = make_cascade(tiny_repository, manifest, delay_s=0.005, max_wait_ms=5)
        await cascade.start()
        full = resolve_options(RequestOptions(policy="full"), exit_plan(manifest))
        await asyncio.gather(*(cascade.infer(images[i: i + 1], full) for i in range(24)))
        await cascade.stop()
        return backend.calls, cascade.metrics

    calls, metrics = asyncio.run(run())
    for stage in (1, 2):
        sizes = [size for s, size in calls if s == stage]
        assert sum(sizes) == 24 and max(sizes) > 1, (stage, sizes)
    assert b'gateway_stage_batch_size_count{depth="8"}' in metrics.render()


def test_a_deep_stage_does_not_wait_for_samples_that_need_its_own_slot_first(tiny_repository, manifest, images):
    """One backend slot: request A's samples reach stage 1 while request B only queues for stage 0.
    Waiting for B would take the one slot for B's stage 0 first, so A's stage 1 (due first) runs at once."""
    async def run():
        cascade, backend = make_cascade(tiny_repository, manifest, delay_s=0.05, workers=1, max_wait_ms=1000)
        await cascade.start()
        full = resolve_options(RequestOptions(policy="full"), exit_plan(manifest))
        first = asyncio.ensure_future(cascade.infer(images[:1], full))
        while not backend.calls:  # A's first stage has started (calls are recorded as they start)
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(cascade.infer(images[1:2], full))
        await asyncio.gather(first, second)
        await cascade.stop()
        return backend.calls

    calls = asyncio.run(run())
    assert calls[:2] == [(0, 1), (1, 1)], calls
    assert sorted(calls) == sorted([(0, 1), (1, 1), (2, 1)] * 2)


def test_a_lone_request_does_not_wait_for_batching(tiny_repository, manifest, images):
    async def run():
        cascade, backend = make_cascade(tiny_repository, manifest, max_wait_ms=1000)
        await cascade.start()
        options = resolve_options(RequestOptions(policy="full"), exit_plan(manifest))
        started = time.perf_counter()
        await cascade.infer(images[:1], options)
        elapsed = time.perf_counter() - started
        await cascade.stop()
        return elapsed, backend.calls

    elapsed, calls = asyncio.run(run())
    assert [size for _, size in calls] == [1, 1, 1]
    # Nothing is upstream, so no stage waits its 1 s maximum (a bound, not a timing benchmark).
    assert elapsed < 1.0


def test_large_requests_are_split_to_the_maximum_batch(tiny_repository, manifest, images):
    async def run():
        cascade, backend = make_cascade(tiny_repository, manifest, max_batch_size=5)
        await cascade.start()
        result = await cascade.infer(images, resolve_options(RequestOptions(policy="full"), exit_plan(manifest)))
        await cascade.stop()
        return result, backend.calls

    result, calls = asyncio.run(run())
    assert len(result.exit_index) == 24 and (result.exit_index == 2).all()
    assert max(size for _, size in calls) <= 5


def test_a_failing_backend_fails_the_request_not_the_cascade(tiny_repository, manifest, images):
    class FlakyBackend(RecordingBackend):
        def run(self, stage, inputs):
            if len(inputs) == 2:
                raise RuntimeError("boom")
            return super().run(stage, inputs)

    async def run():
        backend = FlakyBackend(OnnxRuntimeBackend(tiny_repository, manifest))
        cascade = Cascade(backend, exit_plan(manifest), CascadeSettings(), GatewayMetrics())
        await cascade.start()
        options = resolve_options(RequestOptions(policy="full"), exit_plan(manifest))
        with pytest.raises(Unavailable, match="the backend failed"):  # logged in full, answered without details
            await cascade.infer(images[:2], options)
        ok = await cascade.infer(images[:1], options)
        await cascade.stop()
        return ok

    assert len(asyncio.run(run()).exit_index) == 1


def test_fixed_and_full_run_the_per_exit_model_in_one_call(tiny_repository, manifest, images):
    plan = exit_plan(manifest)

    async def run(direct):
        cascade, backend = make_cascade(tiny_repository, manifest, direct=direct)
        await cascade.start()
        full = await cascade.infer(images[:4], resolve_options(RequestOptions(policy="full"), plan))
        fixed = await cascade.infer(images[:4], resolve_options(RequestOptions(policy="fixed", exit_depth=5), plan))
        await cascade.stop()
        return full, fixed, backend.calls

    full, fixed, calls = asyncio.run(run(direct=True))
    staged_full, staged_fixed, _ = asyncio.run(run(direct=False))
    assert calls == [("exit2", 4), ("exit1", 4)]
    np.testing.assert_allclose(full.logits, staged_full.logits, atol=1e-4)
    np.testing.assert_allclose(fixed.logits, staged_fixed.logits, atol=1e-4)
    assert (full.exit_index == 2).all() and (fixed.exit_index == 1).all()


def test_backend_cpu_is_counted_per_stage_and_within_the_process_cpu(tiny_repository, manifest, images):
    """gateway_backend_cpu_seconds_total grows for the stages that ran, by no more than the process used."""
    plan = exit_plan(manifest)

    async def run():
        cascade, backend = make_cascade(tiny_repository, manifest)
        await cascade.start()
        process_cpu = time.process_time()
        fixed = resolve_options(RequestOptions(policy="fixed", exit_depth=5), plan)
        await asyncio.gather(*(cascade.infer(images[i: i + 2], fixed) for i in range(0, 24, 2)))
        process_cpu = time.process_time() - process_cpu
        await cascade.stop()
        return cascade.metrics, process_cpu, backend.calls

    metrics, process_cpu, calls = asyncio.run(run())
    counted = {depth: metrics.registry.get_sample_value("gateway_backend_cpu_seconds_total", {"stage": str(depth)})
               for depth in plan.depths}
    assert {stage for stage, _ in calls} == {0, 1}  # the segments up to exit 5, never the last
    assert counted[3] > 0 and counted[5] > 0 and counted[8] == 0
    assert sum(counted.values()) <= process_cpu
