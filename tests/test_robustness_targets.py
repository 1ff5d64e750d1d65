"""Issue 25, the robustness run's remaining targets: grpc's own concurrency limit refusals counted in
the gateway's metrics, the cheap open-loop generator (pre-built messages, disjoint cores) and the
overload phase's record, memory given back after an overload, and the budget estimate's tail. Real
gateway processes on the tiny exported model, real gRPC clients; no timing assertions beyond
generous bounds."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from common.manifest import read_manifest

from .conftest import GatewayProcess

MODEL = "mwresnet8_3"


@pytest.fixture(scope="module")
def manifest_shape(tiny_repository):
    return tuple(read_manifest(tiny_repository).input.shape)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{key}="{value}"' in line for key, value in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


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
        assert _metric(quiet, "gateway_errors_total", error="ConcurrentRpcLimit") == 0
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(call, range(6)))
        refused = [outcome for outcome in outcomes if "Concurrent RPC limit" in outcome]
        assert refused and "ok" in outcomes, outcomes
        assert all(outcome == "ok" or outcome in refused for outcome in outcomes), outcomes
        text = process.metrics()
        assert _metric(text, "gateway_errors_total", protocol="grpc", error="ConcurrentRpcLimit") == len(refused)
        assert _metric(text, "gateway_requests_total", protocol="grpc", outcome="error") == len(refused)
        assert _metric(text, "gateway_requests_total", protocol="grpc", outcome="ok") == outcomes.count("ok")
        # Health and metadata calls still go through the per-call handlers and are not counted as refused.
        client = grpcclient.InferenceServerClient(process.grpc_url)
        assert client.is_server_ready() and client.get_model_metadata(MODEL).name == MODEL
        client.close()
        assert _metric(process.metrics(), "gateway_errors_total", error="ConcurrentRpcLimit") == len(refused)
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
    (the process's main thread) stays at 0; --backend-nice 0 leaves every thread as the process."""
    process = GatewayProcess(tiny_repository, "--workers", "3")
    try:
        nice = _thread_nice(process.process.pid)
        assert nice[process.process.pid] == 0
        assert sorted(value for value in nice.values() if value)[-3:] == [10, 10, 10], nice
        assert list(nice.values()).count(10) == 3, nice
    finally:
        assert process.stop() == 0
    process = GatewayProcess(tiny_repository, "--backend-nice", "0")
    try:
        assert set(_thread_nice(process.process.pid).values()) == {0}
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
    if len(os.sched_getaffinity(0)) >= 2:
        split = overload["cpu_pinning"]
        assert split and not set(split["servers"]) & set(split["loadgen"])
        assert document["cpu_pinning"]["phases"] == ["capacity", "overload"]
    assert {"overload_offered_3x", "overload_served", "overload_admitted_p99_ms", "overload_refusal_p99_ms",
            "overload_memory_after_settle"} <= set(document["targets"])
