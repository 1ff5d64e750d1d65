"""A CPU-bound backend's calls at once: at most one per core the gateway may run on (issue 19)."""

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from common.manifest import read_manifest
from serving import cascade_scheduler
from serving.backends import OnnxRuntimeBackend
from serving.cascade import Cascade, CascadeSettings
from serving.policy import RequestOptions, exit_plan, resolve_options

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")


class ConcurrencyBackend:
    """The real ONNX Runtime backend, each call held a little, counting the most calls at once."""

    name = "concurrency"
    has_exit_models = False

    def __init__(self, inner: OnnxRuntimeBackend, cpu_bound: bool) -> None:
        self.inner, self.cpu_bound = inner, cpu_bound
        self.running = self.most = 0
        self.lock = threading.Lock()

    def run(self, stage, inputs):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.02)
            return self.inner.run(stage, inputs)
        finally:
            with self.lock:
                self.running -= 1

    def close(self):
        self.inner.close()


@pytest.fixture
def one_core():
    """The calling thread (the event loop's) on one core, as `taskset -c 0` would start the gateway."""
    original = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(original)})
    try:
        yield original
    finally:
        os.sched_setaffinity(0, original)


def test_the_onnxruntime_backend_on_the_cpu_is_cpu_bound(tiny_repository):
    assert OnnxRuntimeBackend(tiny_repository, read_manifest(tiny_repository), device="cpu").cpu_bound


@pytest.mark.parametrize("cpu_bound", [True, False])
def test_cpu_bound_calls_at_once_follow_the_cores(tiny_repository, one_core, monkeypatch, cpu_bound):
    manifest = read_manifest(tiny_repository)
    plan = exit_plan(manifest)
    first_exit = resolve_options(RequestOptions(thresholds=(0.0,)), plan)  # every sample leaves at exit 0
    images = np.random.default_rng(0).standard_normal((8, *manifest.input.shape)).astype(np.float32)
    monkeypatch.setattr(cascade_scheduler, "CORES_CHECK_S", 0.0)  # the affinity is read at every pump

    async def run():
        backend = ConcurrencyBackend(OnnxRuntimeBackend(tiny_repository, manifest, device="cpu"), cpu_bound)
        cascade = Cascade(backend, plan, CascadeSettings(max_batch_size=1, workers=2))
        await cascade.start()
        pinned = [cascade.slots]
        answers = await asyncio.gather(*(cascade.infer(images[i: i + 1], first_exit) for i in range(8)))
        most_pinned, backend.most = backend.most, 0
        os.sched_setaffinity(0, one_core)  # the gateway may use every core again (pinned after start, say)
        again = await asyncio.gather(*(cascade.infer(images[i: i + 1], first_exit) for i in range(8)))
        pinned.append(cascade.slots)
        await cascade.stop()
        return pinned, most_pinned, backend.most, answers, again

    slots, most_pinned, most_unpinned, answers, again = asyncio.run(run())
    cores = min(2, len(one_core))
    if cpu_bound:
        assert slots == [1, cores] and most_pinned == 1 and most_unpinned == cores
    else:
        assert slots == [2, 2] and most_pinned == 2 and most_unpinned == 2
    for first, second in zip(answers, again):  # the same answers either way
        np.testing.assert_array_equal(first.exit_index, second.exit_index)
        np.testing.assert_allclose(first.logits, second.logits, atol=1e-5)
