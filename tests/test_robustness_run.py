"""The robustness run (benchmarks.robustness, `make robustness`) at seconds per phase on the tiny model,
against real gateway processes (and a real tritonserver when installed)."""

from __future__ import annotations

import json

import httpx
import numpy as np

from .hardening_helpers import MODEL


def test_the_robustness_run_writes_every_phase(tiny_repository, tmp_path):
    """`make robustness` at seconds per phase on the tiny model: every phase runs and records its
    figures and targets; what must hold whatever the machine (no request lost at shutdown, no
    error or duplicate in the soak) holds. The figures themselves mean nothing here."""

    from benchmarks.robustness import PHASES, main
    from benchmarks.triton_launcher import triton_installed

    phases = [phase for phase in PHASES if phase != "triton" or triton_installed()]
    output = tmp_path / "run"
    assert main(["--model-repository", str(tiny_repository), "--output", str(output), "--quick", "--images", "60",
                 "--phases", ",".join(phases), "--capacity-s", "1", "--overload-s", "1", "--settle-s", "0.5",
                 "--budget-s", "1", "--soak-s", "2", "--backlog-s", "1", "--grace-s", "0.2",
                 "--cancel-calls", "10", "--fuzz-requests", "120"]) == 0
    document = json.loads((output / "robustness.json").read_text())
    assert set(document["phases"]) == set(phases)
    assert not [phase for phase, result in document["phases"].items() if "error" in result]
    targets = document["targets"]
    shutdown = document["phases"]["shutdown"]
    assert targets["shutdown_every_request_answered"]["met"] and targets["shutdown_exit_status"]["met"], shutdown
    assert targets["soak_errors"]["met"] and targets["soak_duplicates"]["met"]
    assert document["phases"]["overload"]["outcomes"].get("ok", 0) > 0
    assert document["phases"]["bomb"]["status"] >= 400  # refused, whatever its time
    fuzzed = targets["fuzz_unexpected_5xx"]["measured"]
    assert fuzzed == {"findings": 0, "requests": 120} and targets["fuzz_hangs"]["measured"]["hangs"] == 0
    assert not targets["fuzz_hangs"]["met"]  # 120 requests are not the 50,000 the target asks for
    if "triton" in document["phases"]:
        assert document["phases"]["triton"]["request_while_down"] == "UNAVAILABLE"
    assert document["commit"] and document["command"].startswith("python -m benchmarks.robustness")


def test_the_robustness_run_measures_overload_through_the_front_proxy(tiny_repository, tmp_path):
    """--front-proxy-limit: capacity and overload go through a real nginx (deploy/nginx) in front of the
    gateway; its CPU is measured beside the gateway's and counted in the refusal cost; every call is
    answered or refused. Skipped where nginx is not installed."""
    import pytest

    from benchmarks.front_proxy import nginx_binary
    from benchmarks.robustness import main
    from common.errors import UserError

    try:
        nginx_binary()
    except UserError as error:
        pytest.skip(str(error))
    output = tmp_path / "run"
    assert main(["--model-repository", str(tiny_repository), "--output", str(output), "--quick", "--images", "60",
                 "--phases", "capacity,overload", "--capacity-s", "1", "--overload-s", "1", "--settle-s", "0.5",
                 "--front-proxy-limit", "auto"]) == 0
    document = json.loads((output / "robustness.json").read_text())
    assert document["front_proxy"]["max_in_flight"] == "auto" and document["front_proxy"]["server"] == "nginx"
    # auto: the gateway's own admission bound, as its start-up log line gives it, in both phases
    ready = next(json.loads(line) for line in (output / "logs" / "gateway_overload.log").read_text().splitlines()
                 if '"gateway ready"' in line)
    assert document["front_proxy"]["limits_used"] == [ready["admission_images"]] * 2
    capacity, overload = document["phases"]["capacity"], document["phases"]["overload"]
    assert "error" not in capacity and "error" not in overload, document["phases"]
    assert capacity["cpu"]["cpu_s"]["front_proxy"] > 0 and overload["cpu"]["cpu_s"]["front_proxy"] > 0
    assert sum(overload["outcomes"].values()) == overload["sent"] > 0
    assert set(overload["outcomes"]) <= {"ok", "RESOURCE_EXHAUSTED"} and overload["outcomes"].get("ok", 0) > 0
    if overload["refusal_cost_estimate"] is not None:
        assert overload["refusal_cost_estimate"]["servers"] == ["gateway", "front_proxy"]


def test_the_robustness_run_passes_gateway_arguments_on(tiny_repository, tmp_path):
    """--gateway-arg reaches every gateway the run starts (a real process that takes it)."""
    from benchmarks.robustness import Run

    images = np.zeros((2, 3, 32, 32), np.float32)
    session = Run(tiny_repository, tmp_path, {}, images, None, MODEL, gateway_args=("--budget-reserve", "0.3"))
    with session.gateway("probe", "--workers", "1") as gateway:
        args = list(gateway.process.args)
        ready = httpx.get(f"http://{gateway.http_url}/v2/health/ready", timeout=10).status_code
    assert args[-4:] == ["--budget-reserve", "0.3", "--workers", "1"] and ready == 200


def test_metric_readers_sum_over_labels_they_do_not_name():
    """The robustness run reads /metrics by label subsets, so a series that gains a label (a model's) is
    still counted, summed over its values."""
    from benchmarks.robustness.measure import entry_images, metric
    text = "\n".join([
        "# TYPE gateway_errors_total counter",
        'gateway_errors_total{error="Overloaded",protocol="grpc"} 3.0',
        'gateway_errors_total{error="Overloaded",protocol="http"} 2.0',
        "# TYPE gateway_stage_batch_size histogram",
        'gateway_stage_batch_size_sum{depth="15",model="a"} 7.0',
        'gateway_stage_batch_size_sum{depth="15",model="b"} 5.0',
        'gateway_stage_batch_size_sum{depth="25",model="b"} 5.0',
        'gateway_stage_batch_size_sum{depth="56-direct",model="b"} 1.0',
        "# TYPE gateway_admitted_images gauge",
        "gateway_admitted_images 4.0", ""])
    assert metric(text, "gateway_errors_total", error="Overloaded") == 5.0
    assert metric(text, "gateway_errors_total", error="Overloaded", protocol="grpc") == 3.0
    assert metric(text, "gateway_admitted_images") == 4.0 and metric(text, "gateway_absent_total") == 0
    assert entry_images(text, 15) == 13.0  # stage 0 of both models and the per-exit model
