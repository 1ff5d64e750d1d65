"""The load phases of the robustness run: capacity (the closed loop the others scale from),
overload (open loop at 3x capacity), budget (the budget policy against the first exit's p99) and
soak (four policies mixed for minutes)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np

from benchmarks.cpu import CpuMeter, pinned_self
from benchmarks.loadgen import closed_loop, infer_messages, raw_open_loop
from benchmarks.robustness.measure import counts, metric, percentiles, refusal_cost, rss_mb, rss_split_mb, target
from benchmarks.robustness.session import Session
from benchmarks.servers import GatewayServer
from common.manifest import read_manifest


class LoadPhases(Session):
    """capacity, overload, budget, soak."""

    # capacity ------------------------------------------------------------------
    def capacity(self) -> dict:
        with (pinned_self(self.pinning.loadgen if self.pinning else None),
              self.pinned_front_end("capacity") as (_, url, servers)):
            meter = CpuMeter(servers)
            result = asyncio.run(closed_loop(self.loadgen_target(url), self.images,
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
        with (pinned_self(self.pinning.loadgen if self.pinning else None),
              self.pinned_front_end("overload") as (gateway, url, servers)):
            pid = gateway.process.pid
            started = rss_mb(pid)  # idle after start-up (the old baseline's kind: no overload seen yet)
            asyncio.run(raw_open_loop(url, messages, rate, warm_s, seed=1))
            time.sleep(settle)
            baseline = rss_mb(pid)
            baseline_split = rss_split_mb(pid)
            meter = CpuMeter(servers)
            before = gateway.metrics()
            load, peak = asyncio.run(self._open_loop(gateway, url, messages, rate, seconds, meter))
            after = gateway.metrics()
            end = rss_mb(pid)
            settling = [(0.0, end)]
            settle_started = time.monotonic()
            while (elapsed := time.monotonic() - settle_started) < settle:
                time.sleep(min(1.0, settle - elapsed))
                settling.append((round(time.monotonic() - settle_started, 2), rss_mb(pid)))
            settled = settling[-1][1]
            settled_split = rss_split_mb(pid)
            # The same closed loop as the capacity phase, now after the overload: the host's speed drifts
            # over minutes, so capacity is judged from the windows on both sides of the overload minute.
            after_meter = CpuMeter(servers)
            capacity_after = asyncio.run(closed_loop(self.loadgen_target(url), self.images, self.labels_or_dummy(),
                                                     32, 10**9, self.durations["capacity_s"], meter=after_meter))
        outcomes = load.outcomes
        ok = [ms for outcome, ms in zip(outcomes, load.latency_ms) if outcome == "ok"]
        refused = [ms for outcome, ms in zip(outcomes, load.latency_ms) if outcome == "RESOURCE_EXHAUSTED"]
        ok_service = [ms for outcome, ms in zip(outcomes, load.service_ms) if outcome == "ok"]
        refused_service = [ms for outcome, ms in zip(outcomes, load.service_ms) if outcome == "RESOURCE_EXHAUSTED"]
        served_rps = len(ok) / seconds
        achieved = load.achieved_rps
        bracket = (capacity + capacity_after.throughput) / 2
        refusals = {name: metric(after, "gateway_errors_total", error=name, protocol="grpc")
                    - metric(before, "gateway_errors_total", error=name, protocol="grpc")
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
                  "capacity_after": {"concurrency": 32, "throughput_rps": round(capacity_after.throughput, 1),
                                     "errors": capacity_after.errors, "latency_ms": capacity_after.latency_ms,
                                     "cpu": capacity_after.cpu},
                  "capacity_bracket_rps": round(bracket, 1),
                  "served_of_capacity_bracket": round(served_rps / bracket, 3) if bracket else None,
                  "capacity_definition": "capacity_rps: the capacity phase's closed loop (c=32), which sets the "
                                         "offered rate; capacity_after: the same closed loop on this gateway after "
                                         "the overload and its settling; the target divides by their mean",
                  "admitted_latency_ms": percentiles(ok), "refusal_latency_ms": percentiles(refused),
                  "latency_definition": "from each call's scheduled arrival (open loop); *_from_send_ms: from the "
                                        "moment the generator sent it",
                  "admitted_latency_from_send_ms": percentiles(ok_service),
                  "refusal_latency_from_send_ms": percentiles(refused_service),
                  "memory_mb": {"after_start": started, "warm_up_s": warm_s, "baseline": baseline,
                                "peak": peak, "end_of_load": end, "after_settle": settled,
                                "settling": settling,
                                "split_baseline": baseline_split, "split_after_settle": settled_split,
                                "split_definition": "VmRSS / RssAnon (heap) / RssFile (mapped files) from "
                                                    "/proc/PID/status"}}
        result["refusal_cost_estimate"] = refusal_cost(self.results.get("capacity", {}).get("cpu"), load.cpu,
                                                      len(ok), len(outcomes) - len(ok))
        self.targets += [
            target("overload_offered_3x", ">= 0.95 of 3x capacity really sent (the generator kept up)",
                   round(achieved / rate, 3), achieved >= 0.95 * rate),
            target("overload_served", ">= 0.9 of capacity (the mean of the closed-loop windows before and after "
                   "the overload)", result["served_of_capacity_bracket"],
                   bool(result["served_of_capacity_bracket"] and result["served_of_capacity_bracket"] >= 0.9)),
            target("overload_admitted_p99_ms", "< 1000", result["admitted_latency_ms"].get("p99"),
                   bool(ok) and result["admitted_latency_ms"]["p99"] < 1000),
            target("overload_refusal_p99_ms", "< 10", result["refusal_latency_ms"].get("p99"),
                   bool(refused) and result["refusal_latency_ms"]["p99"] < 10),
            target("overload_memory_after_settle", "within 10% of baseline",
                   round(settled / baseline, 3) if baseline and settled else None,
                   bool(baseline and settled and settled <= 1.1 * baseline)),
        ]
        return result

    async def _open_loop(self, gateway: GatewayServer, url: str, messages: list[bytes], rate: float,
                         seconds: float, meter: CpuMeter):
        peak = [0.0]

        async def memory() -> None:
            while True:
                peak[0] = max(peak[0], rss_mb(gateway.process.pid) or 0.0)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(memory())
        meter.start()
        try:
            load = await raw_open_loop(url, messages, rate, seconds)
        finally:
            sampler.cancel()
        load.cpu = meter.stop(load.sent)
        return load, round(peak[0], 1)

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
