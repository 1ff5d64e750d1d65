"""Calibration sweep, load generator and the benchmark runner on a tiny model."""

import asyncio
import json

import numpy as np
import pytest

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
    assert fixed[-1]["macs_fraction"] == 1.0
    oracle = rows[-1]
    assert oracle["test_acc"] == pytest.approx(correct.any(axis=0).mean())
    assert oracle["test_acc"] >= max(row["test_acc"] for row in fixed) and oracle["macs_fraction"] <= 1.0
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
    names = {p.name for p in output.iterdir()}
    assert {"sweep.csv", "sweep.json", "summary.json", "calibration.json", "REPORT.md", "accuracy_vs_macs.png",
            "throughput_vs_concurrency.png", "p99_vs_throughput.png"} <= names
    for scenario in ("full_gateway_onnxruntime", "early_gateway_onnxruntime", "full_triton_direct",
                     "full_gateway_triton", "early_gateway_triton", "fixed3_gateway_onnxruntime",
                     "budget1x_gateway_onnxruntime"):
        rows = json.loads((output / f"scenario_{scenario}.json").read_text())
        for row in rows:
            assert row["completed"] + row["errors"] == row["sent"] and row["errors"] == 0
    report = (output / "REPORT.md").read_text()
    assert "| scenario | mode |" in report and "(`throughput_ratio_c2`)" in report
    assert np.isfinite(summary["acc_drop_pt"])
