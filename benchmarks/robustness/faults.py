"""The fault phases of the robustness run: cancellation (expired deadlines), shutdown (SIGTERM with a
backlog) and triton (tritonserver killed under the gateway's Triton backend)."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np

from benchmarks.robustness.measure import Caller, counts, entry_images, metric, ready, target, until
from benchmarks.robustness.session import Session
from benchmarks.triton_launcher import DEFAULT_VENV, TritonServer, triton_installed
from common.manifest import read_manifest


class FaultPhases(Session):
    """cancellation, shutdown, triton."""

    # cancellation ---------------------------------------------------------------
    def cancellation(self) -> dict:
        calls, batch, deadline_s = int(self.durations["cancel_calls"]), 16, 0.3
        with self.gateway("cancellation", "--max-queue-images", str(calls * batch)) as gateway:
            outcomes, before = asyncio.run(self._deadline_calls(gateway, calls, batch, deadline_s))
            time.sleep(1.0)  # whatever still runs for them finishes
            after = gateway.metrics()
        first = self._first_depth()
        computed = entry_images(after, first) - entry_images(before, first)
        answered = outcomes.count("ok")
        expired = len(outcomes) - answered
        wasted = max(0.0, computed - answered * batch)  # every answered image ran stage 0 exactly once
        share = wasted / (expired * batch) if expired else 0.0
        dropped = {reason: metric(after, "gateway_dropped_samples_total", reason=reason)
                   - metric(before, "gateway_dropped_samples_total", reason=reason)
                   for reason in ("expired", "cancelled")}
        result = {"calls": calls, "images_per_call": batch, "deadline_ms": deadline_s * 1000,
                  "outcomes": counts(outcomes), "stage0_images_computed": computed,
                  "definition": "images of expired requests that entered a backend call (stage 0), over "
                                "all images of the expired requests",
                  "images_of_expired_requests_computed": wasted, "expired_work_share": round(share, 4),
                  "dropped_samples": dropped}
        self.targets.append(target("cancellation_expired_work_share", "<= 0.10", result["expired_work_share"],
                                   share <= 0.10 if expired else None))
        return result

    def _first_depth(self) -> int:
        return read_manifest(self.repository).exit_depths[0]

    async def _deadline_calls(self, gateway, calls: int, batch: int, deadline_s: float) -> list[str]:
        caller = Caller(gateway.grpc_url, self.model)
        images = np.resize(self.images, (batch, *self.images.shape[1:]))
        for _ in range(3):  # warm: the first large batches of a fresh gateway are slow
            await asyncio.gather(*(caller.call(images) for _ in range(4)))
        before = await asyncio.to_thread(gateway.metrics)
        results = await asyncio.gather(*(caller.call(images, None, deadline_s) for _ in range(calls)))
        await caller.close()
        return [outcome for outcome, _ in results], before

    # shutdown -------------------------------------------------------------------
    def shutdown(self) -> dict:
        batch = 16
        grace = self.durations["grace_s"]
        gateway = self.gateway("shutdown", "--shutdown-grace-s", str(grace), "--max-queue-images", "1000000",
                               "--request-timeout-s", "0")
        try:
            rate = asyncio.run(self._images_per_s(gateway, batch))  # of these requests, on this machine
            calls = max(1, int(self.durations["backlog_s"] * rate) // batch)
            outcomes, admitted, status, elapsed = asyncio.run(self._backlog_then_sigterm(gateway, calls, batch))
        finally:
            gateway.stop()
        answered = sum(outcomes.count(name) for name in ("ok", "UNAVAILABLE", "UNAVAILABLE_CUT"))
        result = {"backlog_s": self.durations["backlog_s"], "images_per_s": round(rate, 1),
                  "backlog_at_sigterm_s": round(admitted / rate, 3) if rate else None, "grace_s": grace,
                  "calls": calls,
                  "images_per_call": batch, "admitted_images_at_sigterm": admitted, "outcomes": counts(outcomes),
                  "exit_status": status, "exit_after_sigterm_s": round(elapsed, 3),
                  "cut": outcomes.count("UNAVAILABLE_CUT"), "refused": outcomes.count("UNAVAILABLE")}
        cut = outcomes.count("UNAVAILABLE_CUT") > 0
        self.targets += [
            target("shutdown_every_request_answered", "success or UNAVAILABLE for all",
                   f"{answered}/{len(outcomes)}", answered == len(outcomes)),
            target("shutdown_exit_status", "3 when requests were cut, else 0", status, status == (3 if cut else 0)),
        ]
        return result

    async def _images_per_s(self, gateway, batch: int, seconds: float = 2.0) -> float:
        """Throughput of `batch`-image requests (closed loop, c=4), images per second."""
        caller = Caller(gateway.grpc_url, self.model)
        images = np.resize(self.images, (batch, *self.images.shape[1:]))
        done = [0]
        stop = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop:
                if (await caller.call(images))[0] == "ok":
                    done[0] += batch

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(4)))
        await caller.close()
        return done[0] / (time.perf_counter() - started)

    async def _backlog_then_sigterm(self, gateway, calls: int, batch: int):
        caller = Caller(gateway.grpc_url, self.model)
        images = np.resize(self.images, (batch, *self.images.shape[1:]))
        tasks = [asyncio.create_task(caller.call(images)) for _ in range(calls)]
        deadline = time.monotonic() + 60
        admitted = 0.0
        while time.monotonic() < deadline:  # SIGTERM once (nearly) all are in, before any finishes
            await asyncio.sleep(0.01)
            admitted = await asyncio.to_thread(lambda: metric(gateway.metrics(), "gateway_admitted_images"))
            if admitted >= 0.9 * calls * batch or any(task.done() for task in tasks):
                break
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
        status = await asyncio.to_thread(gateway.process.wait, 120)
        elapsed = time.monotonic() - signalled
        await caller.close()
        return [outcome for outcome, _ in results], admitted, status, elapsed

    # triton -------------------------------------------------------------------
    def triton(self) -> dict:
        if not triton_installed(DEFAULT_VENV):
            return {"skipped": "no Triton virtualenv (make triton)"}
        logs = self.output / "logs"
        server = TritonServer(self.repository, DEFAULT_VENV, log_path=logs / "triton.log").start()
        gateway = None
        try:
            gateway = self.gateway("triton", "--backend", "triton", "--triton-url", server.grpc_url)
            caller_images = self.images[:1]
            killed = time.monotonic()
            server.process.kill()
            server.process.wait()
            not_ready_s = until(lambda: not ready(gateway.http_url), 30)
            down = time.monotonic()
            while time.monotonic() - down < 2.0:  # requests meanwhile: refused, not hanging
                time.sleep(0.1)
            refused = asyncio.run(self._one(gateway, caller_images))
            back = TritonServer(self.repository, DEFAULT_VENV, log_path=logs / "triton-back.log")
            back.http_port, back.grpc_port, back.metrics_port = server.http_port, server.grpc_port, server.metrics_port
            server = back.start()
            returned = time.monotonic()
            ready_s = until(lambda: ready(gateway.http_url), 60)
            until(lambda: asyncio.run(self._one(gateway, caller_images))[0] == "ok", 60)
            serving_s = time.monotonic() - returned
        finally:
            if gateway is not None:
                gateway.stop()
            server.stop()
        result = {"not_ready_after_kill_s": round(not_ready_s, 3), "request_while_down": refused[0],
                  "request_while_down_ms": round(refused[1], 3),
                  "ready_after_return_s": round(ready_s, 3),
                  "serving_after_return_s": round(serving_s, 3),
                  "kill_to_not_ready_wall_s": round(down - killed, 3)}
        self.targets += [
            target("triton_not_ready_after_kill_s", "<= 1", result["not_ready_after_kill_s"], not_ready_s <= 1.0),
            target("triton_serving_after_return_s", "<= 2", result["serving_after_return_s"],
                   result["serving_after_return_s"] <= 2.0),
        ]
        return result

    async def _one(self, gateway, images) -> tuple[str, float]:
        caller = Caller(gateway.grpc_url, self.model)
        try:
            return await caller.call(images, timeout_s=5)
        finally:
            await caller.close()
