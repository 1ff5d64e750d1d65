"""serving.call_batcher: concurrent requests with the same options go to the backend in one call.

The backend here is a recording coroutine that the test releases call by call (the one thing
tests may fake); the batcher, its deadlines, cancellations, errors and cut are the real code.
The triton-cascade gateway's answers through it are checked against the embedded gateway on a
real tritonserver in tests/test_triton_cascade.py."""

import asyncio
import time

import numpy as np
import pytest

from serving.call_batcher import CallBatcher
from serving.errors import DeadlineExceeded, Unavailable


class RecordingBackend:
    """Answers each image with (its value x 2, the call's key); every call waits until released."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[list[float], object, float]] = []
        self.release = asyncio.Event()
        self.fail = fail

    async def __call__(self, inputs, key, timeout_s):
        self.calls.append((inputs[:, 0].tolist(), key, timeout_s))
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return inputs * 2, np.full((len(inputs), 1), hash(key) % 1000)


def images(*values):
    return np.array([[value] for value in values], dtype=np.float32)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_lone_request_goes_at_once_and_waiting_ones_go_together_by_options():
    async def scenario():
        backend = RecordingBackend()
        batcher = CallBatcher(backend, max_images=64, max_in_flight=1, timeout_s=10)
        first = asyncio.ensure_future(batcher.run(images(1), "a"))
        await settle()
        assert [call[0] for call in backend.calls] == [[1.0]]  # sent without waiting for company
        waiting = [asyncio.ensure_future(batcher.run(images(v, v + 0.5), key))
                   for v, key in [(2, "a"), (3, "b"), (4, "a"), (5, "b"), (6, "a")]]
        await settle()
        assert len(backend.calls) == 1  # the bound: one call at a time, the rest wait
        backend.release.set()
        answers = await asyncio.gather(first, *waiting)
        # after the first call, one call per options, in the order their first request came
        assert [(call[0], call[1]) for call in backend.calls] == [
            ([1.0], "a"), ([2.0, 2.5, 4.0, 4.5, 6.0, 6.5], "a"), ([3.0, 3.5, 5.0, 5.5], "b")]
        for (v, key), (doubled, tag) in zip([(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "b"), (6, "a")], answers):
            expected = [v * 2.0] if v == 1 else [v * 2.0, v * 2.0 + 1.0]
            assert doubled[:, 0].tolist() == expected  # each request gets its own rows, in its order
            assert tag[:, 0].tolist() == [hash(key) % 1000] * len(expected)
        assert batcher.in_flight == 0 and batcher.calls == 3

    asyncio.run(scenario())


def test_a_call_holds_at_most_max_images():
    async def scenario():
        backend = RecordingBackend()
        batcher = CallBatcher(backend, max_images=4, max_in_flight=1, timeout_s=10)
        tasks = [asyncio.ensure_future(batcher.run(images(v, v), "a")) for v in range(5)]
        await settle()
        backend.release.set()
        await asyncio.gather(*tasks)
        assert [len(call[0]) for call in backend.calls] == [2, 4, 4]
        assert sorted(value for call in backend.calls for value in call[0][::2]) == [0.0, 1.0, 2.0, 3.0, 4.0]

    asyncio.run(scenario())


def test_unmerged_requests_go_at_once_alone_beyond_the_bound():
    async def scenario():
        backend = RecordingBackend()
        batcher = CallBatcher(backend, max_images=64, max_in_flight=1, timeout_s=10)
        tasks = [asyncio.ensure_future(batcher.run(images(v), "budget", merge=False)) for v in range(3)]
        await settle()
        assert len(backend.calls) == 3 and batcher.in_flight == 3
        backend.release.set()
        assert [answer[0][0, 0] for answer in await asyncio.gather(*tasks)] == [0.0, 2.0, 4.0]

    asyncio.run(scenario())


def test_deadlines_cancellations_errors_and_cut_are_per_request():
    async def scenario():
        backend = RecordingBackend()
        batcher = CallBatcher(backend, max_images=64, max_in_flight=1, timeout_s=10)
        running = asyncio.ensure_future(batcher.run(images(1), "a", deadline=time.monotonic() + 5))
        await settle()
        soon = asyncio.ensure_future(batcher.run(images(2), "a", deadline=time.monotonic() + 0.05))
        later = asyncio.ensure_future(batcher.run(images(3), "a", deadline=time.monotonic() + 5))
        leaving = asyncio.ensure_future(batcher.run(images(4), "a"))
        await settle()
        leaving.cancel()  # its client left while it waited
        with pytest.raises(DeadlineExceeded):  # answered by its deadline although the backend has not
            await soon
        backend.release.set()
        await running
        assert (await later)[0][0, 0] == 6.0
        # the expired and the cancelled request never reached the backend; the call's timeout is its
        # latest request's remaining time
        assert [call[0] for call in backend.calls] == [[1.0], [3.0]]
        assert 4 < backend.calls[1][2] <= 5

        failing = RecordingBackend(fail=Unavailable("the Triton backend is unavailable"))
        batcher = CallBatcher(failing, max_images=64, max_in_flight=1, timeout_s=10)
        tasks = [asyncio.ensure_future(batcher.run(images(v), "a")) for v in range(3)]
        await settle()
        failing.release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert [type(outcome) for outcome in outcomes] == [Unavailable] * 3  # each request its error
        assert len(failing.calls) == 2

        stuck = RecordingBackend()
        batcher = CallBatcher(stuck, max_images=64, max_in_flight=1, timeout_s=10)
        tasks = [asyncio.ensure_future(batcher.run(images(v), key)) for v, key in [(1, "a"), (2, "a"), (3, "b")]]
        await settle()
        assert batcher.cut(lambda: Unavailable("the gateway shut down")) == 3  # running and waiting alike
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert [type(outcome) for outcome in outcomes] == [Unavailable] * 3
        await settle()
        assert batcher.in_flight == 0 and len(stuck.calls) == 1

    asyncio.run(scenario())
