"""Calibration sweep, load generator and the benchmark runner on a tiny model."""

import asyncio
import json
import os
import time

import numpy as np
import pytest

from benchmarks.cpu import (
    CpuMeter,
    Servers,
    backend_cpu_s,
    cores_cpu_s,
    cores_record,
    cpu_record,
    process_cpu_s,
    split_cores,
)
from benchmarks.exit_outputs import compute_exit_outputs, load_images
from benchmarks.loadgen import Target, closed_loop, open_loop
from benchmarks.run import Plan, run_benchmark
from benchmarks.servers import GatewayServer
from benchmarks.sweep import offline_sweep
from common.errors import UserError
from common.manifest import MANIFEST_FILE, read_manifest
from serving.preprocess import normalise_uint8


@pytest.fixture(scope="module")
def outputs(tiny_repository):
    manifest = read_manifest(tiny_repository)
    heldout = compute_exit_outputs(tiny_repository, manifest, *load_images(manifest, "heldout"), progress=False)
    test = compute_exit_outputs(tiny_repository, manifest, *load_images(manifest, "test"), progress=False)
    return manifest, heldout, test


def test_exit_outputs_use_the_checkpoints_heldout_split(outputs):
    manifest, heldout, test = outputs
    assert heldout.logits.shape == (3, 30, 3) and test.logits.shape == (3, 30, 3)
    assert heldout.scores().shape == (3, 30) and heldout.correct().dtype == bool


def test_sweep_fixed_exits_and_oracle(outputs):
    manifest, heldout, test = outputs
    rows = offline_sweep(manifest, heldout, test, drops_pt=(0.0, 5.0), budgets=(0.5,))
    kinds = [row["kind"] for row in rows]
    assert kinds == ["accuracy_drop", "accuracy_drop", "compute_budget", "fixed_exit", "fixed_exit", "fixed_exit",
                     "oracle"]
    fixed = [row for row in rows if row["kind"] == "fixed_exit"]
    correct = test.correct()
    for index, row in enumerate(fixed):
        assert row["test_acc"] == pytest.approx(correct[index].mean())
        assert row[f"share_exit{manifest.exits[index].depth}"] == 1.0
    # A fixed exit is its per-exit model: the final one is the full network.
    assert fixed[-1]["macs_fraction"] == 1.0
    oracle = rows[-1]
    assert oracle["test_acc"] == pytest.approx(correct.any(axis=0).mean())
    assert oracle["test_acc"] >= max(row["test_acc"] for row in fixed)
    # Through the cascade the final exit also pays the early heads (a few FC layers here).
    assert oracle["macs_fraction"] <= manifest.exits[-1].macs / manifest.full_macs
    budget = rows[2]
    assert budget["thresholds"] is not None and len(budget["thresholds"]) == 3
    for row in rows:
        assert sum(v for k, v in row.items() if k.startswith("share_exit")) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def gateway(tiny_repository, tmp_path_factory):
    with GatewayServer(tiny_repository, log_path=tmp_path_factory.mktemp("gw") / "gateway.log") as server:
        yield server


@pytest.fixture(scope="module")
def test_images(tiny_repository):
    manifest = read_manifest(tiny_repository)
    images, labels = load_images(manifest, "test")
    return normalise_uint8(images, manifest.mean, manifest.std), labels


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closed_loop_counts_add_up(gateway, test_images, protocol):
    url = gateway.grpc_url if protocol == "grpc" else gateway.http_url
    result = asyncio.run(closed_loop(Target(protocol, url, "mwresnet8_3"), *test_images, concurrency=4,
                                     max_requests=60, max_seconds=20))
    assert result.errors == 0 and result.sent == result.completed == 60
    assert sum(result.exits.values()) == 60 and set(result.exits) <= {3, 5, 8}
    assert 0 <= result.accuracy <= 1 and result.throughput > 0
    lat = result.latency_ms
    assert lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]


def test_open_loop_and_budget_attainment(gateway, test_images):
    target = Target("grpc", gateway.grpc_url, "mwresnet8_3", {"policy": "budget", "budget_ms": 500.0},
                    budget_ms=500.0)
    result = asyncio.run(open_loop(target, *test_images, rate=40.0, max_requests=40, max_seconds=3))
    assert result.mode == "open" and result.errors == 0 and result.completed == result.sent > 0
    assert 0.0 <= result.within_budget <= 1.0


def test_errors_are_counted_not_lost(gateway, test_images):
    target = Target("grpc", gateway.grpc_url, "mwresnet8_3", {"policy": "nonsense"})
    result = asyncio.run(closed_loop(target, *test_images, concurrency=2, max_requests=10, max_seconds=10))
    assert result.sent == result.errors == 10 and result.completed == 0
    assert "unknown policy" in result.error_examples[0]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class SlowSender:
    """A fake server whose every send holds the event loop for 10 ms of the fake clock (a generator
    that falls behind its schedule); it answers class 0 at exit 3 and records when each answer came."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.answered_at = clock, {}

    async def infer(self, images, request_id):
        self.clock.now += 0.010
        self.answered_at[request_id] = self.clock.now
        return np.zeros(len(images), dtype=int), np.full(len(images), 3)

    async def close(self) -> None:
        pass


def test_open_loop_latency_runs_from_the_scheduled_arrival():
    clock = FakeClock()
    sender = SlowSender(clock)
    images, labels = np.zeros((4, 3, 8, 8), np.float32), np.zeros(4, dtype=int)
    rate, count, seed = 1000.0, 20, 3
    result = asyncio.run(open_loop(Target("grpc", "127.0.0.1:1", "m"), images, labels, rate, count, 10.0,
                                   seed=seed, client=sender, clock=clock))
    assert result.sent == result.completed == count
    # The same arrivals as the scheduler's: 1 ms apart on average, while each send takes 10 ms.
    started = 100.0 + 5 * 0.010  # after the five warm-up sends
    arrivals = started + np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, count))
    answered = np.array([sender.answered_at[f"r{i}"] for i in range(count)])
    expected_ms = (answered - arrivals) * 1000
    assert result.latency_ms["mean"] == pytest.approx(expected_ms.mean())
    assert result.latency_ms["p99"] == pytest.approx(np.percentile(expected_ms, 99))
    # Measured from when each task started, every request would show the 10 ms of its own send only.
    assert result.latency_ms["p50"] > 10 * 5


def test_cpu_record_per_role_and_the_gateways_own_share():
    before = {"loadgen": 1.0, "gateway": 2.0, "gateway_backend": 0.5, "tritonserver": None}
    after = {"loadgen": 1.2, "gateway": 3.0, "gateway_backend": 1.1, "tritonserver": None}
    record = cpu_record(before, after, requests=100, window_s=2.0)
    assert record["requests"] == 100 and "tritonserver" not in record["cpu_s"]
    assert record["ms_per_request"] == pytest.approx({"loadgen": 2.0, "gateway": 10.0, "gateway_backend": 6.0,
                                                      "gateway_outside_backend": 4.0})


def test_process_cpu_counts_this_process():
    before = process_cpu_s(os.getpid())
    sum(i * i for i in range(200_000))
    assert process_cpu_s(os.getpid()) > before and process_cpu_s(2**22 + 12345) == 0.0  # no such process


def test_cores_record_accounts_every_core_of_a_window():
    before = cores_cpu_s()
    assert set(before) == {f"cpu{index}" for index in range(len(before))} and len(before) >= 1
    sum(i * i for i in range(2_000_000))
    time.sleep(0.2)
    record = cores_record(before, cores_cpu_s())
    assert set(record) == set(before)
    for core in record.values():
        assert set(core) == {"busy", "nice", "irq", "idle", "steal"} and all(value >= 0 for value in core.values())
    # The kernel counts every core in ticks: each core's kinds add up to about the window (0.2 s and more).
    assert all(0.05 < sum(core.values()) < 30 for core in record.values())
    assert sum(core["busy"] + core["nice"] for core in record.values()) > 0  # the loop above ran somewhere


def test_split_cores_is_disjoint_and_none_on_one_core():
    assert split_cores({0}) is None
    assert split_cores({0, 1}).servers == (0,) and split_cores({0, 1}).loadgen == (1,)
    split = split_cores(set(range(8)))
    assert split.servers == (0, 1, 2, 3, 4, 5) and split.loadgen == (6, 7)


@pytest.mark.parametrize("batch", [1, 8])
def test_cpu_accounting_adds_up(gateway, test_images, batch):
    """Per-process CPU over the measured window: non-negative, counted per request sent, and the
    gateway's CPU inside backend calls within its whole CPU."""
    target = Target("grpc", gateway.grpc_url, "mwresnet8_3", batch=batch)
    meter = CpuMeter(Servers(gateway.process.pid, gateway.metrics_url))
    result = asyncio.run(closed_loop(target, *test_images, concurrency=4, max_requests=40, max_seconds=20,
                                     meter=meter))
    assert result.errors == 0 and result.sent == result.completed == 40
    assert result.images_per_request == batch and sum(result.exits.values()) == 40 * batch
    cpu = result.cpu
    assert cpu["requests"] == result.sent and cpu["window_s"] > 0
    assert {"gateway", "loadgen"} <= set(cpu["cpu_s"]) and "tritonserver" not in cpu["cpu_s"]
    assert all(seconds >= 0 for seconds in cpu["cpu_s"].values())
    assert set(cpu["cores_s"]) == set(cores_cpu_s())  # how each core spent the window
    for role, seconds in cpu["cpu_s"].items():
        assert cpu["ms_per_request"][role] == pytest.approx(seconds * 1000 / 40, abs=1e-3)
    if backend_cpu_s(gateway.metrics_url) is None:
        pytest.skip("the gateway does not export gateway_backend_cpu_seconds_total yet")
    assert cpu["cpu_s"]["gateway"] + 1e-3 >= cpu["cpu_s"]["gateway_backend"] >= 0  # threads are in the process
    assert cpu["cpu_s"]["gateway_outside_backend"] == pytest.approx(
        cpu["cpu_s"]["gateway"] - cpu["cpu_s"]["gateway_backend"], abs=1e-3)


def test_the_gateways_admit_every_image_a_closed_loop_has_in_flight():
    from benchmarks.run import FULL, SHORT
    for plan in (FULL, SHORT):  # the batched scenario at the highest level is never refused
        assert plan.queue_images >= max(plan.concurrency) * plan.request_batch


def test_free_ports_are_distinct():
    from benchmarks.triton_launcher import free_ports
    for _ in range(50):  # one after another, ports can repeat; chosen together they never do
        ports = free_ports(3)
        assert len(set(ports)) == 3 and all(port > 0 for port in ports)


def test_only_loopback_targets():
    with pytest.raises(UserError, match="loopback"):
        Target("grpc", "10.1.2.3:8001", "m")


def test_the_runner_writes_every_file_and_leaves_the_repository_as_it_was(tiny_repository, triton_venv, tmp_path):
    manifest_before = (tiny_repository / MANIFEST_FILE).read_text()
    plan = Plan(concurrency=(1, 2), headline_concurrency=2, requests=20, seconds=3.0, rates=(20.0,),
                budget_factors=(1.0, 2.0), images=30)
    output = tmp_path / "out"
    summary = run_benchmark(tiny_repository, output, plan, triton_venv, "test", log=lambda message: None)
    assert (tiny_repository / MANIFEST_FILE).read_text() == manifest_before  # calibrated in a copy
    calibration = json.loads((output / "calibration.json").read_text())
    assert calibration["exit_depths"] == [3, 5, 8] and calibration["method"] == "accuracy_drop"
    assert len(calibration["thresholds"]) == 3 and all(t is not None for t in calibration["thresholds"])
    # Ratios are named after the plan's headline concurrency (c16 in the default plans).
    for key in ("final_exit_test_acc", "early_exit_test_acc", "acc_drop_pt", "mean_macs_fraction",
                "oracle_macs_fraction", "throughput_ratio_c2", "p99_ratio_c2", "triton_throughput_ratio",
                "gateway_overhead_ratio", "budget_attainment", "command", "commit", "machine", "date"):
        assert summary[key] is not None, key
    assert json.loads((output / "summary.json").read_text()) == summary
    for key in ("batched_throughput_ratio_c2", "cpu_ms_per_request_c2", "triton_backend_throughput_ratio"):
        assert summary[key] is not None, key
    for key in ("gateway_overhead_cpu_ms", "staging_overhead_cpu_ms", "gateway_forward_cpu_ms",
                "gateway_added_p50_ms", "cascade_gateway_overhead_ratio", "triton_throughput_ratio_source",
                "cpu_pinning", "skipped_scenarios"):
        assert key in summary, key
    if summary["cpu_pinning"] is not None:
        assert not set(summary["cpu_pinning"]["servers"]) & set(summary["cpu_pinning"]["loadgen"])
    cascade = "early_triton_cascade_direct"
    assert (cascade in summary["skipped_scenarios"]) != (output / f"scenario_{cascade}.json").exists()
    if cascade not in summary["skipped_scenarios"]:  # the repository has the <model>_cascade Triton model
        assert summary["triton_throughput_ratio_source"] == cascade
        for key in ("gateway_forward_cpu_ms", "gateway_added_p50_ms", "cascade_gateway_overhead_ratio"):
            assert summary[key] is not None, key
        assert set(summary["cpu_ms_per_request_c2"]["early_gateway_triton_cascade"]) >= {
            "gateway", "tritonserver", "triton_stubs", "loadgen"}
    names = {p.name for p in output.iterdir()}
    assert {"sweep.csv", "sweep.json", "summary.json", "calibration.json", "REPORT.md", "accuracy_vs_macs.png",
            "throughput_vs_concurrency.png", "p99_vs_throughput.png"} <= names
    for scenario in ("full_gateway_onnxruntime", "early_gateway_onnxruntime", "full_triton_direct",
                     "full_gateway_triton", "early_gateway_triton", "fixed3_gateway_onnxruntime",
                     "budget1x_gateway_onnxruntime", "full_gateway_onnxruntime_batch8",
                     "early_gateway_onnxruntime_batch8", "early_triton_cascade_direct", "early_gateway_triton_cascade"):
        if scenario in summary["skipped_scenarios"]:
            continue
        rows = json.loads((output / f"scenario_{scenario}.json").read_text())
        for row in rows:
            assert row["completed"] + row["errors"] == row["sent"] and row["errors"] == 0
            assert row["cpu"]["requests"] == row["sent"] and min(row["cpu"]["cpu_s"].values()) >= 0
            roles = set(row["cpu"]["cpu_s"])
            assert ("gateway" in roles) == ("gateway" in scenario) and ("tritonserver" in roles) == (
                "triton" in scenario)
    report = (output / "REPORT.md").read_text()
    assert "| scenario | mode |" in report and "(`throughput_ratio_c2`)" in report
    assert "## Where the CPU goes" in report and "(`gateway_overhead_cpu_ms`)" in report
    assert np.isfinite(summary["acc_drop_pt"])
    # Above 1 when the cascade leaves earlier than the oracle, at some cost in accuracy.
    assert np.isfinite(summary["saving_over_oracle"]) and "(`saving_over_oracle`)" in report
    assert summary["saving_over_oracle"] == pytest.approx(
        (1 - summary["mean_macs_fraction"]) / (1 - summary["oracle_macs_fraction"]), abs=1e-3)


def test_the_accuracy_plot_shows_an_earlier_run_beside_this_one(outputs, tmp_path):
    from benchmarks.report import plot_accuracy_vs_macs

    manifest, heldout, test = outputs
    rows = offline_sweep(manifest, heldout, test, drops_pt=(0.0, 5.0), budgets=(0.5,))
    earlier = [{**row, "test_acc": row["test_acc"] * 0.9} for row in rows]
    plot_accuracy_vs_macs(rows, tmp_path / "plot.png", baseline=("earlier run (x)", earlier))
    assert (tmp_path / "plot.png").stat().st_size > 10_000
