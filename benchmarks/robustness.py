"""The gateway under overload, cancellations, shutdown, backend faults and hostile uploads
(issue 25): each phase against a real gateway process (and a real tritonserver for the
fault phase), with real clients; the figures and whether each target is met go to
benchmarks/results/<run>/robustness.json.

    python -m benchmarks.robustness                           # every phase, the issue's durations
    python -m benchmarks.robustness --phases overload,budget  # some phases
    python -m benchmarks.robustness --quick                   # every phase, seconds each (a smoke test)

Phases:
- capacity: closed loop at c=32 (one image a request): the throughput the others scale from;
- overload: open loop at 3x capacity for --overload-s: successes per second against capacity,
  p99 of admitted requests, how fast refusals (429 / RESOURCE_EXHAUSTED) come, and the
  gateway's memory before, at the end, and --settle-s after the load stops;
- cancellation: 200 gRPC calls x 16 images at once with a 300 ms deadline: the share of the
  expired requests' images the gateway still computed (stage-0 samples from /metrics);
- shutdown: a backlog of --backlog-s of work, SIGTERM, grace --grace-s: every request must be
  answered (success or UNAVAILABLE), none dropped; the exit status says whether any was cut;
- triton: tritonserver killed (-9) under the gateway's Triton backend: time until the gateway is
  not ready, and from Triton's return until it is ready and serving;
- budget: fixed exit 1 (the first exit alone) at c=16 and c=32 gives its p99; the budget policy
  at 1x and 1.5x that p99: share within budget and accuracy against the first exit's;
- soak: closed loop at c=32, four policies mixed, for --soak-s: errors, duplicates, memory slope
  after the first fifth;
- bomb: 100 copies of a 7999x7999 1-bit PNG in one /v1/classify upload: time to the refusal, and
  the slowest /v2/health/ready answer meanwhile;
- fuzz: --fuzz-requests mutated requests from benchmarks.fuzz (JSON, binary, raw bodies, uploads,
  gRPC messages and bytes): findings (unexpected 5xx, UNKNOWN/INTERNAL, dropped, invalid JSON) and
  hangs; a 504 for a request whose own `timeout` expired is expected, not a finding.

Numbers from a busy machine mean little: run it on a quiet one (make robustness).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.cpu import CoreSplit, CpuMeter, Servers, pin_process_tree, pinned_self, split_cores
from benchmarks.loadgen import Target, closed_loop, infer_messages, raw_open_loop
from benchmarks.servers import GatewayServer
from benchmarks.triton_launcher import DEFAULT_VENV, TritonServer, triton_installed
from common.errors import UserError, run_cli
from common.manifest import ManifestError, read_manifest
from common.paths import REPO_ROOT
from common.provenance import git_commit, machine_description, utc_timestamp

PHASES = ("capacity", "overload", "cancellation", "shutdown", "triton", "budget", "soak", "bomb", "fuzz")
ISSUE_DURATIONS = {"capacity_s": 15.0, "overload_s": 60.0, "settle_s": 10.0, "backlog_s": 15.0, "grace_s": 5.0,
                   "budget_s": 20.0, "soak_s": 600.0, "cancel_calls": 200, "fuzz_requests": 50_000}
QUICK_DURATIONS = {"capacity_s": 2.0, "overload_s": 2.0, "settle_s": 1.0, "backlog_s": 2.0, "grace_s": 0.5,
                   "budget_s": 2.0, "soak_s": 4.0, "cancel_calls": 40, "fuzz_requests": 300}
FUZZ_TARGET_REQUESTS = 50_000


# -- measuring helpers ------------------------------------------------------------

def rss_mb(pid: int) -> float | None:
    """Resident memory of a process, MB (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    array = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(array, q)), 3) for q in (50, 90, 99)} | {
        "max": round(float(array.max()), 3)}


def metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def entry_images(text: str, first_depth: int) -> float:
    """Images that entered a backend call in a lane requests enter by (stage 0, or a per-exit model)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith('gateway_stage_batch_size_sum{depth="'):
            depth = line.split('"')[1]
            if depth == str(first_depth) or depth.endswith("-direct"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def status_name(error: Exception) -> str:
    status = getattr(error, "status", None)
    text = str(status() if callable(status) else "") or type(error).__name__
    return text.removeprefix("StatusCode.")


class Caller:
    """One tritonclient gRPC asyncio client; each call's outcome (`ok` or the gRPC code) and latency."""

    def __init__(self, url: str, model: str) -> None:
        import tritonclient.grpc.aio as module

        self.module, self.model = module, model
        self.client = module.InferenceServerClient(url)

    async def call(self, images: np.ndarray, parameters: dict | None = None,
                   timeout_s: float | None = None) -> tuple[str, float]:
        tensor = self.module.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        started = time.perf_counter()
        try:
            await self.client.infer(self.model, [tensor], parameters=parameters or None, client_timeout=timeout_s)
            outcome = "ok"
        except Exception as error:  # InferenceServerException and transport errors alike
            outcome = status_name(error)
            if outcome == "UNAVAILABLE" and "before this request finished" in str(error):
                outcome = "UNAVAILABLE_CUT"  # in flight at the end of a shutdown's grace period
        return outcome, (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()


def refusal_cost(capacity_cpu: dict | None, overload_cpu: dict | None, served: int, refused: int) -> dict | None:
    """The gateway's CPU per refused call under overload, estimated: its CPU in the overload window less
    what the served requests cost at capacity (CPU per request of the closed loop), over the refusals;
    and the share of the gateway's CPU that went to refusing."""
    try:
        per_served = capacity_cpu["ms_per_request"]["gateway"]
        total_ms = overload_cpu["cpu_s"]["gateway"] * 1000
    except (KeyError, TypeError):
        return None
    refusing_ms = max(0.0, total_ms - served * per_served)
    return {"gateway_ms_per_served_at_capacity": per_served,
            "gateway_ms_per_refusal": round(refusing_ms / refused, 4) if refused else None,
            "refusing_share_of_gateway_cpu": round(refusing_ms / total_ms, 3) if total_ms else None}


def counts(outcomes: list[str]) -> dict:
    return {name: outcomes.count(name) for name in sorted(set(outcomes))}


def target(name: str, goal: str, measured, met: bool | None) -> dict:
    return {"target": goal, "measured": measured, "met": met, "name": name}


# -- phases -------------------------------------------------------------------------

class Run:
    def __init__(self, repository: Path, output: Path, durations: dict, images: np.ndarray, labels: np.ndarray | None,
                 model: str, log=print, pinning: CoreSplit | None = None, gateway_args: tuple[str, ...] = ()) -> None:
        self.repository, self.output, self.durations, self.log = repository, output, durations, log
        self.gateway_args = tuple(gateway_args)  # added to every gateway's command line (experiments)
        self.pinning = pinning  # capacity and overload: the gateway on pinning.servers, the load on .loadgen
        self.images, self.labels, self.model = images, labels, model
        self.results: dict = {}
        self.targets: list[dict] = []
        self.capacity_rps: float | None = None
        (output / "logs").mkdir(parents=True, exist_ok=True)

    def gateway(self, name: str, *args: str) -> GatewayServer:
        return GatewayServer(self.repository, *self.gateway_args, *args,
                             log_path=self.output / "logs" / f"gateway_{name}.log")

    def loadgen_target(self, url: str, parameters: dict | None = None, budget_ms: float | None = None) -> Target:
        return Target("grpc", url, self.model, parameters or {}, budget_ms=budget_ms)

    def labels_or_dummy(self) -> np.ndarray:
        return self.labels if self.labels is not None else np.full(len(self.images), -1)

    # capacity ------------------------------------------------------------------
    def pinned_gateway(self, name: str, *args: str) -> GatewayServer:
        """A gateway started on the servers' cores (so it sizes its default queue bound for them), its whole
        process tree kept there; this process runs the load from the other cores."""
        with pinned_self(self.pinning.servers if self.pinning else None):
            gateway = self.gateway(name, *args)
        if self.pinning is not None:
            pin_process_tree(gateway.process.pid, self.pinning.servers)
        return gateway

    def capacity(self) -> dict:
        with pinned_self(self.pinning.loadgen if self.pinning else None), self.pinned_gateway("capacity") as gateway:
            meter = CpuMeter(Servers(gateway.process.pid, gateway.metrics_url))
            result = asyncio.run(closed_loop(self.loadgen_target(gateway.grpc_url), self.images,
                                             self.labels_or_dummy(), 32, 10**9, self.durations["capacity_s"],
                                             meter=meter))
        self.capacity_rps = result.throughput
        return {"concurrency": 32, "throughput_rps": round(result.throughput, 1), "errors": result.errors,
                "latency_ms": result.latency_ms, "cpu_pinning": self.pinning.as_dict() if self.pinning else None,
                "cpu": result.cpu}

    def _capacity(self) -> float:
        if self.capacity_rps is None:
            self.results["capacity"] = self.capacity()
        return self.capacity_rps

    # overload ------------------------------------------------------------------
    def overload(self) -> dict:
        """Open loop at 3x the capacity measured under the same pinning; the generator sends pre-built
        messages (benchmarks.loadgen.raw_open_loop) from its own cores. The memory baseline is taken idle
        after a warm-up at the same load shape (the first overload's allocations made), settle_s after it."""
        capacity = self._capacity()
        rate = 3 * capacity
        seconds, settle = self.durations["overload_s"], self.durations["settle_s"]
        warm_s = min(5.0, seconds / 6)
        messages = infer_messages(self.model, self.images, min(len(self.images), 512))
        with pinned_self(self.pinning.loadgen if self.pinning else None), self.pinned_gateway("overload") as gateway:
            pid = gateway.process.pid
            started = rss_mb(pid)  # idle after start-up (the old baseline's kind: no overload seen yet)
            asyncio.run(raw_open_loop(gateway.grpc_url, messages, rate, warm_s, seed=1))
            time.sleep(settle)
            baseline = rss_mb(pid)
            meter = CpuMeter(Servers(pid, gateway.metrics_url))
            before = gateway.metrics()
            load, peak = asyncio.run(self._open_loop(gateway, messages, rate, seconds, meter))
            after = gateway.metrics()
            end = rss_mb(pid)
            settling = [(0.0, end)]
            settle_started = time.monotonic()
            while (elapsed := time.monotonic() - settle_started) < settle:
                time.sleep(min(1.0, settle - elapsed))
                settling.append((round(time.monotonic() - settle_started, 2), rss_mb(pid)))
            settled = settling[-1][1]
        outcomes = load.outcomes
        ok = [ms for outcome, ms in zip(outcomes, load.latency_ms) if outcome == "ok"]
        refused = [ms for outcome, ms in zip(outcomes, load.latency_ms) if outcome == "RESOURCE_EXHAUSTED"]
        ok_service = [ms for outcome, ms in zip(outcomes, load.service_ms) if outcome == "ok"]
        refused_service = [ms for outcome, ms in zip(outcomes, load.service_ms) if outcome == "RESOURCE_EXHAUSTED"]
        served_rps = len(ok) / seconds
        achieved = load.achieved_rps
        refusals = {name: metric(after, "gateway_errors_total", f'{{error="{name}",protocol="grpc"}}')
                    - metric(before, "gateway_errors_total", f'{{error="{name}",protocol="grpc"}}')
                    for name in ("Overloaded", "ConcurrentRpcLimit")}
        result = {"capacity_rps": round(capacity, 1), "offered_rps": round(rate, 1),
                  "achieved_offered_rps": round(achieved, 1), "achieved_of_capacity": round(achieved / capacity, 3),
                  "seconds": seconds, "scheduled": load.scheduled, "sent": load.sent,
                  "send_lag_ms": percentiles(load.send_lag_ms),
                  "generator": "benchmarks.loadgen.raw_open_loop: pre-serialized ModelInfer messages, one image "
                               "each, over 4 gRPC channels from one asyncio loop",
                  "cpu_pinning": self.pinning.as_dict() if self.pinning else None, "cpu": load.cpu,
                  "outcomes": counts(outcomes), "gateway_refusals": refusals, "served_rps": round(served_rps, 1),
                  "served_of_capacity": round(served_rps / capacity, 3) if capacity else None,
                  "admitted_latency_ms": percentiles(ok), "refusal_latency_ms": percentiles(refused),
                  "latency_definition": "from each call's scheduled arrival (open loop); *_from_send_ms: from the "
                                        "moment the generator sent it",
                  "admitted_latency_from_send_ms": percentiles(ok_service),
                  "refusal_latency_from_send_ms": percentiles(refused_service),
                  "memory_mb": {"after_start": started, "warm_up_s": warm_s, "baseline": baseline,
                                "peak": peak, "end_of_load": end, "after_settle": settled,
                                "settling": settling}}
        result["refusal_cost_estimate"] = refusal_cost(self.results.get("capacity", {}).get("cpu"), load.cpu,
                                                      len(ok), len(outcomes) - len(ok))
        self.targets += [
            target("overload_offered_3x", ">= 0.95 of 3x capacity really sent (the generator kept up)",
                   round(achieved / rate, 3), achieved >= 0.95 * rate),
            target("overload_served", ">= 0.9 of capacity", result["served_of_capacity"],
                   bool(result["served_of_capacity"] and result["served_of_capacity"] >= 0.9)),
            target("overload_admitted_p99_ms", "< 1000", result["admitted_latency_ms"].get("p99"),
                   bool(ok) and result["admitted_latency_ms"]["p99"] < 1000),
            target("overload_refusal_p99_ms", "< 10", result["refusal_latency_ms"].get("p99"),
                   bool(refused) and result["refusal_latency_ms"]["p99"] < 10),
            target("overload_memory_after_settle", "within 10% of baseline",
                   round(settled / baseline, 3) if baseline and settled else None,
                   bool(baseline and settled and settled <= 1.1 * baseline)),
        ]
        return result

    async def _open_loop(self, gateway: GatewayServer, messages: list[bytes], rate: float, seconds: float,
                         meter: CpuMeter):
        peak = [0.0]

        async def memory() -> None:
            while True:
                peak[0] = max(peak[0], rss_mb(gateway.process.pid) or 0.0)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(memory())
        meter.start()
        try:
            load = await raw_open_loop(gateway.grpc_url, messages, rate, seconds)
        finally:
            sampler.cancel()
        load.cpu = meter.stop(load.sent)
        return load, round(peak[0], 1)

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
        dropped = {reason: metric(after, "gateway_dropped_samples_total", f'{{reason="{reason}"}}')
                   - metric(before, "gateway_dropped_samples_total", f'{{reason="{reason}"}}')
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
            not_ready_s = _until(lambda: not _ready(gateway.http_url), 30)
            down = time.monotonic()
            while time.monotonic() - down < 2.0:  # requests meanwhile: refused, not hanging
                time.sleep(0.1)
            refused = asyncio.run(self._one(gateway, caller_images))
            back = TritonServer(self.repository, DEFAULT_VENV, log_path=logs / "triton-back.log")
            back.http_port, back.grpc_port, back.metrics_port = server.http_port, server.grpc_port, server.metrics_port
            server = back.start()
            returned = time.monotonic()
            ready_s = _until(lambda: _ready(gateway.http_url), 60)
            _until(lambda: asyncio.run(self._one(gateway, caller_images))[0] == "ok", 60)
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

    # budget -------------------------------------------------------------------
    def budget(self) -> dict:
        manifest = read_manifest(self.repository)
        first = manifest.exit_depths[0]
        seconds, labels = self.durations["budget_s"], self.labels_or_dummy()
        result = {}
        with self.gateway("budget") as gateway:
            for concurrency in (16, 32):
                fixed = asyncio.run(closed_loop(self.loadgen_target(gateway.grpc_url, {"policy": "fixed",
                                                                                      "exit_depth": first}),
                                                self.images, labels, concurrency, 10**9, seconds))
                p99 = fixed.latency_ms.get("p99")
                level = {"first_exit": {"p99_ms": p99, "accuracy": fixed.accuracy, "errors": fixed.errors}}
                for factor, goal in ((1.0, 0.95), (1.5, 0.99)):
                    budget_ms = p99 * factor if p99 else 100.0
                    measured = asyncio.run(closed_loop(self.loadgen_target(
                        gateway.grpc_url, {"policy": "budget", "budget_ms": budget_ms}, budget_ms),
                        self.images, labels, concurrency, 10**9, seconds))
                    level[f"budget_{factor:g}x"] = {"budget_ms": round(budget_ms, 3),
                                                    "within_budget": measured.within_budget,
                                                    "accuracy": measured.accuracy, "exits": measured.exits,
                                                    "latency_ms": measured.latency_ms, "errors": measured.errors}
                    within = measured.within_budget
                    better = (None if self.labels is None or measured.accuracy is None or fixed.accuracy is None
                              else measured.accuracy > fixed.accuracy)
                    self.targets += [
                        target(f"budget_c{concurrency}_{factor:g}x_within", f">= {goal}", within,
                               within is not None and within >= goal),
                        target(f"budget_c{concurrency}_{factor:g}x_accuracy_above_first_exit", "higher",
                               measured.accuracy, better),
                    ]
                result[f"c{concurrency}"] = level
        return result

    # soak -----------------------------------------------------------------------
    def soak(self) -> dict:
        seconds, labels = self.durations["soak_s"], self.labels_or_dummy()
        depths = read_manifest(self.repository).exit_depths
        mixes = [{}, {"policy": "full"}, {"policy": "fixed", "exit_depth": depths[0]},
                 {"policy": "budget", "budget_ms": 50.0}]
        with self.gateway("soak") as gateway:
            samples: list[tuple[float, float]] = []
            stop = threading.Event()

            def sample() -> None:
                started = time.monotonic()
                while not stop.wait(max(0.5, seconds / 100)):
                    samples.append((time.monotonic() - started, rss_mb(gateway.process.pid) or 0.0))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()

            async def mixed():
                return await asyncio.gather(*(closed_loop(self.loadgen_target(gateway.grpc_url, parameters),
                                                          self.images, labels, 8, 10**9, seconds)
                                              for parameters in mixes))

            try:
                results = asyncio.run(mixed())
            except RuntimeError as error:  # loadgen raises on a duplicate response
                results, duplicate = [], str(error)
            else:
                duplicate = None
            stop.set()
            sampler.join()
        after = [(t, mb) for t, mb in samples if t >= seconds / 5]
        slope = None
        if len(after) >= 3:
            slope = float(np.polyfit([t / 60 for t, _ in after], [mb for _, mb in after], 1)[0])
        errors = sum(result.errors for result in results)
        result = {"seconds": seconds, "concurrency": 8 * len(mixes), "policies": mixes,
                  "requests": sum(result.completed for result in results), "errors": errors,
                  "duplicates": duplicate, "memory_slope_mb_per_min": None if slope is None else round(slope, 3),
                  "memory_mb": {"first": samples[0][1] if samples else None,
                                "last": samples[-1][1] if samples else None},
                  "latency_ms": {json.dumps(parameters): result.latency_ms
                                 for parameters, result in zip(mixes, results)}}
        self.targets += [
            target("soak_errors", "0", errors, errors == 0 and bool(results)),
            target("soak_duplicates", "0", 0 if duplicate is None else 1, duplicate is None),
            target("soak_memory_slope_mb_per_min", "< 1", result["memory_slope_mb_per_min"],
                   None if slope is None else slope < 1.0),
        ]
        return result

    # bomb -----------------------------------------------------------------------
    def bomb(self) -> dict:
        import httpx
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("1", (7999, 7999)).save(buffer, format="PNG")
        png = buffer.getvalue()
        files = [("files", (f"bomb{i}.png", png, "image/png")) for i in range(100)]
        with self.gateway("bomb") as gateway:
            health: list[float] = []
            stop = threading.Event()

            def poll() -> None:
                with httpx.Client(timeout=30) as client:
                    while not stop.is_set():
                        started = time.perf_counter()
                        with contextlib.suppress(httpx.HTTPError):
                            client.get(f"http://{gateway.http_url}/v2/health/ready")
                        health.append((time.perf_counter() - started) * 1000)
                        time.sleep(0.005)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            time.sleep(0.2)
            # The client (and its connection) is made before the clock starts: the figure is the
            # gateway's refusal, not httpx's start-up (30-60 ms on these VMs).
            with httpx.Client(timeout=120) as client:
                client.get(f"http://{gateway.http_url}/v2/health/live")
                started = time.perf_counter()
                answer = client.post(f"http://{gateway.http_url}/v1/classify", files=files)
                elapsed = (time.perf_counter() - started) * 1000
            time.sleep(0.2)
            stop.set()
            poller.join()
            memory = rss_mb(gateway.process.pid)
        result = {"png_bytes": len(png), "copies": 100, "status": answer.status_code,
                  "answer": answer.text[:300], "refused_after_ms": round(elapsed, 3),
                  "health_latency_ms": percentiles(health), "memory_mb_after": memory}
        self.targets += [
            target("bomb_refused_ms", "refused (4xx) in < 100", round(elapsed, 3),
                   400 <= answer.status_code < 500 and elapsed < 100),
            target("bomb_health_max_ms", "< 50", result["health_latency_ms"].get("max"),
                   bool(health) and max(health) < 50),
        ]
        return result


    # fuzz -----------------------------------------------------------------------
    def fuzz(self) -> dict:
        from benchmarks.fuzz import fuzz

        shape = tuple(read_manifest(self.repository).input.shape)
        requests = int(self.durations["fuzz_requests"])
        with self.gateway("fuzz") as gateway:
            result = asyncio.run(fuzz(gateway.http_url, gateway.grpc_url, self.model, shape, requests))
            result["ready_after"] = _ready(gateway.http_url)
        findings = result["bad"] - result["hangs"]
        enough = result["requests"] >= FUZZ_TARGET_REQUESTS
        self.targets += [
            target("fuzz_unexpected_5xx", f"0 unexpected 5xx / UNKNOWN / INTERNAL / dropped / invalid JSON in "
                   f">= {FUZZ_TARGET_REQUESTS} requests (504 for an expired own timeout is expected)",
                   {"findings": findings, "requests": result["requests"]}, findings == 0 and enough),
            target("fuzz_hangs", f"0 in >= {FUZZ_TARGET_REQUESTS} requests",
                   {"hangs": result["hangs"], "requests": result["requests"]},
                   result["hangs"] == 0 and enough and result["ready_after"]),
        ]
        return result


def _ready(address: str) -> bool:
    import httpx

    try:
        return httpx.get(f"http://{address}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _until(condition, timeout: float, interval: float = 0.01) -> float:
    """Seconds until `condition()` held (polled every `interval`); raises after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


def load_workload(repository: Path, data: Path | None, count: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Normalised test images and labels (random images without labels when the data is not there)."""
    from serving.preprocess import normalise_uint8

    manifest = read_manifest(repository)
    try:
        from benchmarks.exit_outputs import load_images

        images, labels = load_images(manifest, "test", data=data)
        chosen = np.random.default_rng(0).permutation(len(labels))[:count]
        return normalise_uint8(images[chosen], manifest.mean, manifest.std), np.asarray(labels)[chosen], "test"
    except Exception as error:  # no dataset here: random images, no accuracy
        print(f"no test images ({error}); random images, no accuracy figures")
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, size=(count, *manifest.input.shape[1:], manifest.input.shape[0]), dtype=np.uint8)
        return normalise_uint8(raw, manifest.mean, manifest.std), None, "random"


def run(repository: Path, output: Path, phases: list[str], durations: dict, data: Path | None = None,
        images: int = 2000, command: str = "", log=print, pin: bool = True,
        gateway_args: tuple[str, ...] = ()) -> dict:
    try:
        manifest = read_manifest(repository)
    except ManifestError as error:
        raise UserError(str(error)) from None
    output.mkdir(parents=True, exist_ok=True)
    pixels, labels, source = load_workload(repository, data, images)
    pinning = split_cores() if pin else None
    if pinning:
        log(f"capacity and overload: the gateway on cores {list(pinning.servers)}, "
            f"the load generator on {list(pinning.loadgen)}")
    session = Run(repository, output, durations, pixels, labels, manifest.model, log, pinning, gateway_args)
    for phase in phases:
        log(f"phase {phase}")
        started = time.monotonic()
        try:
            session.results[phase] = getattr(session, phase)()
        except Exception as error:  # one failing phase is recorded, the others still run
            session.results[phase] = {"error": f"{type(error).__name__}: {error}"[:500]}
        session.results[phase]["phase_wall_s"] = round(time.monotonic() - started, 2)
        log(json.dumps({phase: session.results[phase]}, default=str)[:2000])
    document = {"command": command, "commit": git_commit(), "machine": machine_description(),
                "date": utc_timestamp(), "cpus": os.cpu_count(),
                "cpu_pinning": {"phases": ["capacity", "overload"], **pinning.as_dict()} if pinning else None,
                "model": manifest.model, "images": source, "gateway_args": list(gateway_args),
                "durations": durations, "phases": session.results,
                "targets": {entry.pop("name"): entry for entry in session.targets}}
    (output / "robustness.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--output", type=Path, default=None,
                        help="results directory (default benchmarks/results/<date>-<machine>-robustness)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help="seconds per phase: a smoke test, not figures")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the checkpoint's)")
    parser.add_argument("--images", type=int, default=2000, help="test images the load draws from")
    parser.add_argument("--no-pin", action="store_true", help="capacity and overload: gateway and load "
                        "generator share every core (default: disjoint cores, as benchmarks.run)")
    parser.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                        help="added to every gateway's command line (repeat; e.g. --gateway-arg=--budget-reserve "
                             "--gateway-arg=0.3): experiments, not the defaults the targets are about")
    for name, default in ISSUE_DURATIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                            help=f"default {default} ({QUICK_DURATIONS[name]} with --quick)")
    args = parser.parse_args(argv)
    phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise UserError(f"unknown phases {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    durations = dict(QUICK_DURATIONS if args.quick else ISSUE_DURATIONS)
    for name in durations:
        if getattr(args, name) is not None:
            durations[name] = getattr(args, name)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the servers started here stop
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    output = args.output or REPO_ROOT / "benchmarks" / "results" / f"{stamp}-{platform.node()}-robustness"
    command = "python -m benchmarks.robustness " + " ".join(sys.argv[1:] if argv is None else argv)
    document = run(args.model_repository, output, phases, durations, args.data, args.images, command,
                   pin=not args.no_pin, gateway_args=tuple(args.gateway_arg))
    print(json.dumps(document["targets"], indent=2))
    print(f"results in {output / 'robustness.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
