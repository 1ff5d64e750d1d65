"""Concurrent requests with the same options go to a backend in one call (issue 19).

The `--backend triton-cascade` gateway forwards every request to `<model>_cascade`.
One gRPC call per request costs the gateway a client call (a task, a future, protobuf
building and parsing, grpc's C core) on top of the server side's; Triton's front end
pays one request each too. `CallBatcher` keeps at most `max_in_flight` calls running;
the requests that arrive meanwhile wait, grouped by their options, and go together
in one call (up to `max_images` images) as soon as a call returns. A lone request
never waits: below the bound it is sent at once, from its own task (no task, future
or timer of the batcher's: the call's timeout is its deadline). The backend answers per image with
the request's options, so a request's rows are what it would get alone.

Every request keeps its own deadline (a timer answers it `DeadlineExceeded` while
it waits or while its call runs; the call's timeout is the latest of its requests'),
a request whose client left is skipped (or its rows ignored), a failed call fails
each of its requests with the same error, and `cut` answers everything still waiting
or running (shutdown). Requests that must not be merged (`merge=False`: a latency
budget that counts from when the backend starts on the call) are sent at once, alone.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable, Hashable

import numpy as np

from serving.errors import DeadlineExceeded

Call = Callable[[np.ndarray, Hashable, float], Awaitable[tuple[np.ndarray, ...]]]


class _Member:
    __slots__ = ("inputs", "future", "deadline", "timer")

    def __init__(self, inputs: np.ndarray, future: asyncio.Future, deadline: float | None) -> None:
        self.inputs, self.future, self.deadline, self.timer = inputs, future, deadline, None


class _Batch:
    __slots__ = ("key", "members", "images")

    def __init__(self, key: Hashable) -> None:
        self.key, self.members, self.images = key, [], 0


class CallBatcher:
    """`call(inputs, key, timeout_s)` runs images with the options `key` stands for and returns arrays
    with one row per image; at most `max_in_flight` calls run at once (`merge=False` ones aside)."""

    def __init__(self, call: Call, max_images: int, max_in_flight: int, timeout_s: float) -> None:
        if max_images < 1 or max_in_flight < 1:
            raise ValueError("max_images and max_in_flight must be at least 1")
        self.call, self.max_images, self.max_in_flight, self.timeout_s = call, max_images, max_in_flight, timeout_s
        self.in_flight = 0  # calls running
        self.calls = 0  # calls made (for tests and metrics)
        self._open: dict[Hashable, _Batch] = {}  # the batch each key's new requests join
        self._full: list[_Batch] = []  # batches that reached max_images, first to go
        self._running: dict[asyncio.Task, list[_Member]] = {}  # each running call's requests
        self._alone: set[asyncio.Task] = set()  # the tasks of requests sent at once, from their own task
        self._cut_error: Callable[[], Exception] | None = None  # set by cut
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, inputs: np.ndarray, key: Hashable, deadline: float | None = None,
                  merge: bool = True) -> tuple[np.ndarray, ...]:
        """`inputs` (at most max_images) through the backend with the options `key`, answered by
        `deadline` (a time.monotonic(); None: the batcher's timeout) or DeadlineExceeded."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if merge and self.in_flight < self.max_in_flight:  # (then nothing waits: _flush would start it now)
            return await self._run_alone(inputs, key, deadline)
        member = _Member(inputs, self._loop.create_future(), deadline)
        if deadline is not None:
            member.timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, member)
        if merge:
            batch = self._open.get(key)
            if batch is not None and batch.images + len(inputs) > self.max_images:
                self._full.append(self._open.pop(key))
                batch = None
            if batch is None:
                batch = self._open[key] = _Batch(key)
            batch.members.append(member)
            batch.images += len(inputs)
            self._flush()
        else:
            alone = _Batch(key)
            alone.members.append(member)
            self._start(alone)
        try:
            return await member.future
        finally:
            if member.timer is not None:
                member.timer.cancel()

    async def _run_alone(self, inputs: np.ndarray, key: Hashable, deadline: float | None) -> tuple[np.ndarray, ...]:
        task = asyncio.current_task()
        self.in_flight += 1
        self.calls += 1
        self._alone.add(task)
        try:
            timeout_s = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
            if timeout_s <= 0:
                raise DeadlineExceeded("the request's deadline passed before it was sent")
            return await self.call(inputs, key, timeout_s)
        except asyncio.CancelledError:
            if self._cut_error is not None and task not in self._alone:  # cut took it: answered, not dropped
                raise self._cut_error() from None
            raise
        finally:
            self._alone.discard(task)
            self.in_flight -= 1
            self._flush()

    @staticmethod
    def _expire(member: _Member) -> None:
        if not member.future.done():
            member.future.set_exception(DeadlineExceeded("the request's deadline passed before it was answered"))

    def _flush(self) -> None:
        """Start waiting batches while fewer than max_in_flight calls run: full ones first, then the
        others in the order their first request arrived."""
        while self.in_flight < self.max_in_flight:
            if self._full:
                batch = self._full.pop(0)
            elif self._open:
                batch = self._open.pop(next(iter(self._open)))
            else:
                return
            self._start(batch)

    def _start(self, batch: _Batch) -> None:
        live = [member for member in batch.members if not member.future.done()]
        if not live:  # every request of it expired or left while it waited
            return
        self.in_flight += 1
        self.calls += 1
        task = self._loop.create_task(self._send(batch.key, live))
        self._running[task] = live
        task.add_done_callback(self._running.pop)

    async def _send(self, key: Hashable, members: list[_Member]) -> None:
        try:
            inputs = members[0].inputs if len(members) == 1 else np.concatenate([m.inputs for m in members])
            now = time.monotonic()
            timeout_s = self.timeout_s
            if all(member.deadline is not None for member in members):
                timeout_s = min(timeout_s, max(member.deadline for member in members) - now)
            if timeout_s <= 0:
                raise DeadlineExceeded("the request's deadline passed before it was sent")
            outputs = await self.call(inputs, key, timeout_s)
        except asyncio.CancelledError:  # cut: its requests are answered there
            raise
        except Exception as error:  # the backend's error, for each request of the call
            for member in members:
                if not member.future.done():
                    member.future.set_exception(error if len(members) == 1 else copy.copy(error))
        else:
            offset = 0
            for member in members:
                count = len(member.inputs)
                if not member.future.done():
                    member.future.set_result(tuple(output[offset:offset + count] for output in outputs))
                offset += count
        finally:
            self.in_flight -= 1
            self._flush()

    def cut(self, error_factory: Callable[[], Exception]) -> int:
        """Answer every request still waiting or running `error_factory()` and cancel the running calls;
        returns how many requests were answered so."""
        self._cut_error = error_factory
        members = [member for batch in [*self._full, *self._open.values()] for member in batch.members]
        self._full.clear()
        self._open.clear()
        for task, running in list(self._running.items()):
            members.extend(running)
            task.cancel()
        answered = len(self._alone)
        for task in list(self._alone):
            self._alone.discard(task)
            task.cancel()
        for member in members:
            if not member.future.done():
                member.future.set_exception(error_factory())
                answered += 1
        return answered
