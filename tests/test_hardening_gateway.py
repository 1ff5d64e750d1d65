"""Issue 25, the core, against real gateway processes called by real clients on the tiny model: a gRPC
deadline or an HTTP client that leaves takes its request out of the cascade, overload is refused
(429 / RESOURCE_EXHAUSTED), SIGTERM answers every request, and readiness follows a real tritonserver
that is killed and comes back. No timing assertions beyond generous bounds."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from benchmarks.robustness.measure import metric
from common.manifest import read_manifest

from .conftest import GatewayProcess
from .hardening_helpers import MODEL
from .test_hardening_core import marked


@pytest.fixture(scope="module")
def manifest(tiny_repository):
    return read_manifest(tiny_repository)


# -- a real gateway process ----------------------------------------------------

def _infer_grpc(url, images, parameters=None, client_timeout=None):
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    try:
        return client.infer(MODEL, [tensor], parameters=parameters or {}, client_timeout=client_timeout)
    finally:
        client.close()


def _infer_http(url, images, parameters=None, headers=None):
    """KServe v2 over HTTP with the binary-tensor extension (httpx: the answer's headers are readable)."""
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(images.shape),
                                     "parameters": {"binary_data_size": images.nbytes}}],
                         "parameters": parameters or {}}).encode()
    return httpx.post(f"http://{url}/v2/models/{MODEL}/infer", content=header + images.tobytes(), timeout=60,
                      headers={"Inference-Header-Content-Length": str(len(header)),
                               "Content-Type": "application/octet-stream", **(headers or {})})


@pytest.fixture(scope="module")
def slow_gateway(tiny_repository, tmp_path_factory):
    """One sample per backend call on one worker: requests stay in flight long enough to see."""
    log = tmp_path_factory.mktemp("slow") / "gateway.log"
    process = GatewayProcess(tiny_repository, "--workers", "1", "--max-batch-size", "1", "--max-wait-ms", "0",
                             "--max-queue-images", "1100", log_path=log)
    yield process
    assert process.stop() == 0


def _metrics_once_idle(gateway, timeout_s: float = 30.0) -> str:
    """The gateway's /metrics once it holds no admitted images (or after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = gateway.metrics()
        if metric(text, "gateway_admitted_images") == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_a_grpc_deadline_takes_the_request_out_of_the_cascade(slow_gateway, manifest):
    images = marked(manifest, 80.0, 256)
    before = slow_gateway.metrics()
    log_start = len(slow_gateway.log_path.read_text())

    def call(_):
        try:
            _infer_grpc(slow_gateway.grpc_url, images, {"threshold": 2.0}, client_timeout=0.1)
            return "ok"
        except InferenceServerException as error:
            return str(error.status())

    with ThreadPoolExecutor(4) as pool:  # 4 x 768 single-sample calls: far more than 0.1 s of work
        outcomes = list(pool.map(call, range(4)))
    assert "StatusCode.DEADLINE_EXCEEDED" in outcomes and set(outcomes) <= {"ok", "StatusCode.DEADLINE_EXCEEDED"}
    # The gateway drops what is left of it (a generous bound: its 768 stage calls never all run).
    text = _metrics_once_idle(slow_gateway)
    dropped = sum(metric(text, "gateway_dropped_samples_total", reason=reason)
                  - metric(before, "gateway_dropped_samples_total", reason=reason)
                  for reason in ("expired", "cancelled"))
    assert dropped > 0 and metric(text, "gateway_admitted_images") == 0
    computed = sum(metric(text, "gateway_stage_batch_size_count", depth=str(depth))
                   - metric(before, "gateway_stage_batch_size_count", depth=str(depth)) for depth in (3, 5, 8))
    assert computed < 4 * 3 * len(images)
    # A `timeout` parameter (microseconds, as tritonclient sends it) is a deadline too: 504.
    answer = _infer_http(slow_gateway.http_url, images[:1], {"timeout": 1})
    assert answer.status_code == 504, answer.text[:200]
    assert _infer_http(slow_gateway.http_url, images[:1], {"timeout": 30_000_000}).status_code == 200
    # So is an HTTP `timeout` header (seconds).
    assert _infer_http(slow_gateway.http_url, images[:1], headers={"timeout": "0.000001"}).status_code == 504
    assert _infer_http(slow_gateway.http_url, images[:1], headers={"timeout": "30"}).status_code == 200
    # A call whose deadline passed before its answer could be sent is no internal error.
    log = slow_gateway.log_path.read_text()[log_start:]
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


def test_http_clients_that_disconnect_have_their_requests_cancelled(slow_gateway, manifest):
    """An HTTP client that leaves cancels its request as a gRPC cancellation does: its samples are
    dropped before the next backend call (reason "cancelled"), and nothing is logged as internal."""
    images = marked(manifest, 85.0, 256)  # 768 single-sample stage calls a request
    before = slow_gateway.metrics()
    log_start = len(slow_gateway.log_path.read_text())

    def call(_):
        try:  # the client gives up 0.1 s into waiting for its answer and closes its connection
            _infer_http_with_timeout(slow_gateway.http_url, images, httpx.Timeout(60, read=0.1))
            return "answered"
        except httpx.ReadTimeout:
            return "left"

    with ThreadPoolExecutor(4) as pool:  # 4 x 256 images: within the slow gateway's admission bound
        outcomes = list(pool.map(call, range(4)))
    assert "left" in outcomes
    left = outcomes.count("left") * len(images)
    text = _metrics_once_idle(slow_gateway)
    assert metric(text, "gateway_admitted_images") == 0
    cancelled = (metric(text, "gateway_dropped_samples_total", reason="cancelled")
                 - metric(before, "gateway_dropped_samples_total", reason="cancelled"))
    assert cancelled > left / 2, (cancelled, outcomes)  # most of their images never computed
    gone = (metric(text, "gateway_errors_total", error="ClientDisconnected", protocol="http")
            - metric(before, "gateway_errors_total", error="ClientDisconnected", protocol="http"))
    assert gone == outcomes.count("left")
    log = slow_gateway.log_path.read_text()[log_start:]  # what the gateway logged during this test
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
    # The gateway serves on: a client that waits gets its answer.
    assert _infer_http(slow_gateway.http_url, images[:1]).status_code == 200


def _infer_http_with_timeout(url, images, timeout):
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(images.shape),
                                     "parameters": {"binary_data_size": images.nbytes}}],
                         "parameters": {"threshold": 2.0}}).encode()
    return httpx.post(f"http://{url}/v2/models/{MODEL}/infer", content=header + images.tobytes(), timeout=timeout,
                      headers={"Inference-Header-Content-Length": str(len(header)),
                               "Content-Type": "application/octet-stream"})


def test_overload_is_refused_with_429_and_resource_exhausted(slow_gateway, manifest):
    images = marked(manifest, 90.0, 256)  # 768 single-sample calls each: 4 fit in the bound, 6 arrive at once

    def grpc_call(_):
        try:
            _infer_grpc(slow_gateway.grpc_url, images, {"threshold": 2.0})
            return "ok"
        except InferenceServerException as error:
            return str(error.status())

    def http_call(_):
        answer = _infer_http(slow_gateway.http_url, images, {"threshold": 2.0})
        return answer.status_code, answer.headers.get("retry-after")

    with ThreadPoolExecutor(12) as pool:
        grpc_results = list(pool.map(grpc_call, range(6)))
        http_results = list(pool.map(http_call, range(6)))
    assert "ok" in grpc_results and "StatusCode.RESOURCE_EXHAUSTED" in grpc_results
    assert set(grpc_results) <= {"ok", "StatusCode.RESOURCE_EXHAUSTED"}
    statuses = {status for status, _ in http_results}
    assert 200 in statuses and 429 in statuses and statuses <= {200, 429}
    assert all(int(retry) >= 1 for status, retry in http_results if status == 429)
    assert metric(slow_gateway.metrics(), "gateway_admitted_images") == 0


def test_sigterm_answers_every_request_and_the_exit_status_says_what_was_cut(tiny_repository, manifest, tmp_path):
    log = tmp_path / "gateway.log"
    process = GatewayProcess(tiny_repository, "--workers", "1", "--max-batch-size", "1", "--max-wait-ms", "0",
                             "--shutdown-grace-s", "0", "--max-queue-images", "100000", log_path=log)
    images = marked(manifest, 95.0, 256)
    try:
        def call(position):
            try:
                if position % 2:
                    client = httpclient.InferenceServerClient(process.http_url, network_timeout=60)
                    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
                    tensor.set_data_from_numpy(images)
                    client.infer(MODEL, [tensor], parameters={"threshold": 2.0})
                else:
                    _infer_grpc(process.grpc_url, images, {"threshold": 2.0})
                return "ok"
            except InferenceServerException as error:
                return str(error.status())

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call, position) for position in range(8)]
            deadline = time.monotonic() + 60
            while metric(process.metrics(), "gateway_admitted_images") < 8 * len(images):
                assert time.monotonic() < deadline and not any(f.done() for f in futures)
                time.sleep(0.02)
            process.process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            with pytest.raises(Exception):  # no new calls once the drain has begun  # noqa: B017
                _infer_grpc(process.grpc_url, images[:1], client_timeout=5)
            outcomes = [future.result(timeout=60) for future in futures]
        status = process.process.wait(timeout=60)
    finally:
        process.stop()
    assert set(outcomes) <= {"ok", "503", "StatusCode.UNAVAILABLE"}, outcomes
    assert set(outcomes) & {"503", "StatusCode.UNAVAILABLE"}  # a grace of 0: what is running is cut
    assert status == 3
    text = log.read_text()
    assert "answered UNAVAILABLE" in text and "stopped" in text


# -- a Triton backend that comes and goes ---------------------------------------

def _ready(process) -> bool:
    try:
        return httpx.get(f"http://{process.http_url}/v2/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never met"
        time.sleep(0.05)


def test_readiness_follows_triton_and_the_gateway_reconnects(tiny_repository, triton_venv, manifest, tmp_path):
    from benchmarks.triton_launcher import TritonServer

    images = marked(manifest, 99.0, 3)
    triton = TritonServer(tiny_repository, triton_venv, log_path=tmp_path / "triton.log").start()
    plain = fallback = whole = None
    try:
        plain = GatewayProcess(tiny_repository, "--backend", "triton", "--triton-url", triton.grpc_url,
                               "--health-interval-ms", "100", log_path=tmp_path / "plain.log")
        fallback = GatewayProcess(tiny_repository, "--backend", "triton", "--triton-url", triton.grpc_url,
                                  "--health-interval-ms", "100", "--triton-fallback", log_path=tmp_path / "fb.log")
        whole = GatewayProcess(tiny_repository, "--backend", "triton-cascade", "--triton-url", triton.grpc_url,
                               "--health-interval-ms", "100", log_path=tmp_path / "whole.log")
        expected = _infer_grpc(plain.grpc_url, images, {"threshold": 0.6}).as_numpy("exit_depth")

        triton.process.kill()  # kill -9: no goodbye
        triton.process.wait()
        _wait_for(lambda: not _ready(plain) and not _ready(whole))
        for gateway in (plain, whole):
            answer = _infer_http(gateway.http_url, images)
            assert answer.status_code == 503 and "127.0.0.1" not in answer.text and MODEL not in answer.text
        assert _ready(fallback)  # the fallback gateway answers from embedded ONNX Runtime meanwhile
        assert _infer_grpc(fallback.grpc_url, images, {"threshold": 0.6}).as_numpy("exit_depth").tolist() \
            == expected.tolist()

        back = TritonServer(tiny_repository, triton_venv, log_path=tmp_path / "triton-back.log")
        back.http_port, back.grpc_port, back.metrics_port = triton.http_port, triton.grpc_port, triton.metrics_port
        triton = back.start()
        _wait_for(lambda: _ready(plain) and _ready(whole))
        for gateway in (plain, whole):
            assert _infer_grpc(gateway.grpc_url, images, {"threshold": 0.6}).as_numpy("exit_depth").tolist() \
                == expected.tolist()
        assert "backend unavailable" in (tmp_path / "plain.log").read_text()
    finally:
        for process in (plain, fallback, whole):
            if process is not None:
                assert process.stop() == 0
        triton.stop()
