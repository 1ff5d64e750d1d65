"""Issue 25, the robustness run's remaining targets: grpc's own concurrency limit refusals counted in
the gateway's metrics, the cheap open-loop generator (pre-built messages, disjoint cores) and the
overload phase's record, memory given back after an overload, and the budget estimate's tail. Real
gateway processes on the tiny exported model, real gRPC clients; no timing assertions beyond
generous bounds."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from benchmarks.robustness.measure import metric
from common.manifest import read_manifest
from serving.backends import OnnxRuntimeBackend

from .conftest import GatewayProcess

MODEL = "mwresnet8_3"


@pytest.fixture(scope="module")
def manifest_shape(tiny_repository):
    return tuple(read_manifest(tiny_repository).input.shape)


def test_grpc_concurrency_limit_refusals_are_counted(tiny_repository, manifest_shape):
    """Calls grpc refuses by its own limit (RESOURCE_EXHAUSTED 'Concurrent RPC limit exceeded!', never
    reaching the gateway's code) appear in gateway_errors_total{error="ConcurrentRpcLimit"}, one per
    refused call, and nothing else is counted there."""
    process = GatewayProcess(tiny_repository, "--workers", "1", "--max-batch-size", "1", "--max-wait-ms", "0",
                             "--grpc-max-concurrent-rpcs", "2")
    images = np.random.default_rng(3).standard_normal((256, *manifest_shape)).astype(np.float32)

    def call(_):
        client = grpcclient.InferenceServerClient(process.grpc_url)
        tensor = grpcclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        try:  # 256 images x 3 single-sample stages each: long enough for 6 calls to overlap
            client.infer(MODEL, [tensor], parameters={"threshold": 2.0})
            return "ok"
        except InferenceServerException as error:
            return f"{error.status()} {error.message()}"
        finally:
            client.close()

    try:
        quiet = process.metrics()
        assert metric(quiet, "gateway_errors_total", error="ConcurrentRpcLimit") == 0
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(call, range(6)))
        refused = [outcome for outcome in outcomes if "Concurrent RPC limit" in outcome]
        assert refused and "ok" in outcomes, outcomes
        assert all(outcome.startswith("StatusCode.RESOURCE_EXHAUSTED") for outcome in refused), outcomes
        assert all(outcome == "ok" or outcome in refused for outcome in outcomes), outcomes
        text = process.metrics()
        assert metric(text, "gateway_errors_total", protocol="grpc", error="ConcurrentRpcLimit") == len(refused)
        assert metric(text, "gateway_requests_total", protocol="grpc", outcome="error") == len(refused)
        assert metric(text, "gateway_requests_total", protocol="grpc", outcome="ok") == outcomes.count("ok")
        # Health and metadata calls still go through the per-call handlers and are not counted as refused.
        client = grpcclient.InferenceServerClient(process.grpc_url)
        assert client.is_server_ready() and client.get_model_metadata(MODEL).name == MODEL
        client.close()
        assert metric(process.metrics(), "gateway_errors_total", error="ConcurrentRpcLimit") == len(refused)
    finally:
        assert process.stop() == 0


def _thread_nice(pid: int) -> dict[int, int]:
    """Nice value of every thread of `pid` (field 19 of /proc/<pid>/task/<tid>/stat)."""
    from pathlib import Path

    values = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        values[int(task.name)] = int(fields[16])
    return values


def test_backend_threads_run_below_the_event_loop(tiny_repository):
    """--backend-nice (default 10): the backend threads run at that nice value, the event loop's thread
    (the process's main thread) stays at the process's own nice value (inherited: 0, or what `nice` ran
    the tests at); --backend-nice 0 leaves every thread as the process. The budget policy's optional-stage
    thread runs at --optional-nice (default --backend-nice; -1: none)."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the gateway inherits this process's nice value
    if base >= 10:
        pytest.skip(f"the tests run at nice {base}: backend threads at nice 10 cannot run below the event loop")
    process = GatewayProcess(tiny_repository, "--workers", "3")
    try:
        nice = _thread_nice(process.process.pid)
        assert nice[process.process.pid] == base
        assert sorted(value for value in nice.values() if value != base)[-4:] == [10, 10, 10, 10], nice
        assert list(nice.values()).count(10) == 4, nice  # the 3 workers and the optional-stage thread
    finally:
        assert process.stop() == 0
    for optional, counts in (("15", {10: 3, 15: 1}), ("-1", {10: 3, 15: 0})):
        process = GatewayProcess(tiny_repository, "--workers", "3", "--optional-nice", optional)
        try:
            nice = list(_thread_nice(process.process.pid).values())
            assert {value: nice.count(value) for value in counts} == counts, nice
        finally:
            assert process.stop() == 0
    process = GatewayProcess(tiny_repository, "--backend-nice", "0")
    try:
        assert set(_thread_nice(process.process.pid).values()) == {base}
    finally:
        assert process.stop() == 0


def test_the_default_queue_bound_counts_the_cores_the_gateway_may_use():
    """Two workers on one core run one batch at a time: the default admission bound (max-queue-ms of work)
    is sized for min(workers, cores), so admitted requests wait about max-queue-ms, not twice that."""
    from benchmarks.cpu import pinned_self
    from serving.app import parallel_workers
    from serving.cascade import default_queue_images

    cores = sorted(os.sched_getaffinity(0))
    assert parallel_workers(64) == len(cores) and parallel_workers(1) == 1
    with pinned_self((cores[0],)):
        assert parallel_workers(2) == 1
        assert default_queue_images(2.0, parallel_workers(2), 300, 64) == 150
    assert default_queue_images(2.0, 2, 300, 64) == 300


def test_grpc_pending_calls_option_reaches_grpc():
    """--grpc-max-pending-calls sets grpc's pending-call limits (random early detection from half of it)."""
    from serving.app import grpc_limits
    from serving.settings import load_settings

    options = dict(grpc_limits(load_settings(["--grpc-max-pending-calls", "64"]), 100).options())
    assert options["grpc.server.max_pending_requests"] == 32
    assert options["grpc.server.max_pending_requests_hard_limit"] == 64
    assert "grpc.server.max_pending_requests" not in dict(grpc_limits(load_settings([]), 100).options())


def test_overload_phase_records_the_generator_and_the_split(tiny_repository, tmp_path):
    """The overload phase, seconds long on the tiny model: the gateway and the generator on disjoint cores
    (when there are two), the rate really offered and the generator's lag recorded next to the rate
    scheduled, every call's outcome counted, grpc's and the gateway's refusals from /metrics, and the
    target that says whether the generator kept up."""
    import json

    from benchmarks.robustness import main

    output = tmp_path / "run"
    assert main(["--model-repository", str(tiny_repository), "--phases", "capacity,overload", "--quick",
                 "--images", "64", "--output", str(output)]) == 0
    document = json.loads((output / "robustness.json").read_text())
    overload = document["phases"]["overload"]
    assert "error" not in overload, overload
    assert overload["sent"] == overload["scheduled"] > 0
    assert sum(overload["outcomes"].values()) == overload["sent"]
    assert overload["achieved_offered_rps"] > 0 and overload["send_lag_ms"]["p50"] >= 0
    assert set(overload["gateway_refusals"]) == {"Overloaded", "ConcurrentRpcLimit"}
    refused = overload["outcomes"].get("RESOURCE_EXHAUSTED", 0)
    assert sum(overload["gateway_refusals"].values()) == refused  # every refusal the client saw is counted
    assert overload["cpu"]["cpu_s"]["gateway"] > 0
    assert overload["refusal_cost_estimate"]["gateway_ms_per_served_at_capacity"] > 0
    if len(os.sched_getaffinity(0)) >= 2:
        split = overload["cpu_pinning"]
        assert split and not set(split["servers"]) & set(split["loadgen"])
        assert document["cpu_pinning"]["phases"] == ["capacity", "overload"]
    assert {"overload_offered_3x", "overload_served", "overload_admitted_p99_ms", "overload_refusal_p99_ms",
            "overload_memory_after_settle"} <= set(document["targets"])
    # Capacity measured on both sides of the overload; the target judges the served rate by their mean.
    after = overload["capacity_after"]
    assert after["errors"] == 0 and after["throughput_rps"] > 0 and after["cpu"]["cpu_s"]["gateway"] > 0
    bracket = (overload["capacity_rps"] + after["throughput_rps"]) / 2
    assert overload["capacity_bracket_rps"] == pytest.approx(bracket, abs=0.06)
    assert overload["served_of_capacity_bracket"] == pytest.approx(overload["served_rps"] / bracket, abs=0.01)
    assert document["targets"]["overload_served"]["measured"] == overload["served_of_capacity_bracket"]
    assert set(overload["cpu"]["cores_s"]) == {f"cpu{core}" for core in range(len(overload["cpu"]["cores_s"]))}
    memory = overload["memory_mb"]
    for split in (memory["split_baseline"], memory["split_after_settle"]):  # the heap apart from mapped files
        assert split["anon"] > 0 and split["file"] > 0
        assert split["anon"] + split["file"] <= split["rss"] + 0.2


def test_resident_memory_splits_into_heap_and_mapped_files():
    """/proc/PID/status's split: growing this process's heap by 64 MB shows in `anon`, not in `file`."""
    from benchmarks.robustness.measure import rss_mb, rss_split_mb

    before = rss_split_mb(os.getpid())
    held = np.ones(64 * 2**20 // 8)  # touched: resident
    after = rss_split_mb(os.getpid())
    assert after["anon"] - before["anon"] >= 60
    assert abs(after["file"] - before["file"]) < 30
    assert abs(rss_mb(os.getpid()) - after["rss"]) < 30
    assert rss_split_mb(2**22 + 12345) == {}  # no such process
    del held


# -- the budget policy: deeper stages are optional work ------------------------------------------

def test_a_budget_request_deeper_stages_go_after_every_mandatory_stage(tiny_repository):
    """A budget request past its first exit has an answer: its deeper stages queue after every request's
    mandatory work (here a later-deadline confidence request's whole cascade), yet still run when the
    budget allows, and it answers from its deepest exit."""
    from .test_hardening_core import hold, make, marked, options, settled

    manifest = read_manifest(tiny_repository)

    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1, max_batch_size=2)
        await cascade.start(marked(manifest, 1.0))  # the warm-up seeds every stage's cost
        backend.calls.clear()
        blocker = await hold(cascade, backend, manifest)
        now = time.monotonic()
        budget = asyncio.create_task(cascade.infer(marked(manifest, 80.0, 2), options(
            manifest, policy="budget", budget_ms=30_000.0, thresholds=(2.0,))))
        await asyncio.sleep(0)
        later = asyncio.create_task(cascade.infer(marked(manifest, 81.0, 2), options(manifest, thresholds=(2.0,)),
                                                  deadline=now + 60))
        await asyncio.sleep(0)
        backend.calls.clear()
        backend.gate.set()
        results = await asyncio.wait_for(asyncio.gather(blocker, budget, later), 20)
        await cascade.stop()
        return results, [call for call in backend.calls if call[0].startswith("seg")], settled(cascade), \
            cascade.gave_up

    (_, budget, later), calls, clean, gave_up = asyncio.run(run())
    lanes = [lane for lane, _, _ in calls]
    assert lanes == ["seg0", "seg0", "seg1", "seg2", "seg1", "seg2"], calls
    assert calls[0][2] == [80.0, 80.0] and calls[1][2] == [81.0, 81.0]  # the budget request's first exit first
    assert (budget.exit_index == 2).all() and (later.exit_index == 2).all()
    assert clean and gave_up == 0


def test_a_budget_request_whose_next_stage_cannot_start_in_time_answers_from_the_exit_it_passed(tiny_repository):
    """Its next stage waits behind mandatory work past the point where it could still end within the
    budget less the reserve: it leaves the queue and answers from the exit it passed (those logits,
    that exit), in time, instead of running late; the other request is unaffected."""
    from .test_hardening_core import make, marked, options, settled, until

    manifest = read_manifest(tiny_repository)
    images = marked(manifest, 90.0)

    async def run():
        cascade, backend = make(tiny_repository, manifest, workers=1, max_batch_size=1)
        await cascade.start(marked(manifest, 1.0))  # the warm-up seeds every stage's cost
        backend.calls.clear()
        backend.held_lane = "seg1"  # the slot stays busy with the mandatory request's second stage
        backend.gate.clear()
        budget = asyncio.create_task(cascade.infer(images, options(manifest, policy="budget", budget_ms=300.0,
                                                                   thresholds=(2.0,))))
        await asyncio.sleep(0)
        mandatory = asyncio.create_task(cascade.infer(marked(manifest, 91.0), options(manifest, thresholds=(2.0,))))
        answer = await asyncio.wait_for(budget, 20)  # answered while the slot is still held
        running = [lane for lane, _, _ in backend.calls]
        backend.gate.set()
        other = await asyncio.wait_for(mandatory, 20)
        await until(lambda: settled(cascade))
        await cascade.stop()
        return answer, running, other, cascade.gave_up

    answer, running, other, gave_up = asyncio.run(run())
    assert running == ["seg0", "seg0", "seg1"]  # its own seg0, the other's seg0, the other's seg1 (held)
    expected = OnnxRuntimeBackend(tiny_repository, manifest).run(0, images)[0]
    assert (answer.exit_index == 0).all() and np.allclose(answer.logits, expected, atol=1e-5)
    assert (other.exit_index == 2).all() and gave_up == 1
