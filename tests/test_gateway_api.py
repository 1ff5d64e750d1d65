"""The gateway as a real process, called by real tritonclient and HTTP clients."""

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from common.manifest import read_manifest
from common.onnxruntime_session import create_session

from .conftest import GatewayProcess, png_bytes

MODEL = "mwresnet8_3"


@pytest.fixture(scope="module")
def gateway(tiny_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    process = GatewayProcess(tiny_repository, "--max-body-mb", "1", "--max-request-batch", "64", log_path=log)
    yield process
    assert process.stop() == 0
    assert "stopped" in log.read_text()


@pytest.fixture(scope="module")
def images(tiny_repository):
    shape = read_manifest(tiny_repository).input.shape
    return (np.random.default_rng(1).standard_normal((6, *shape)) * 2).astype(np.float32)


def final_exit_logits(repository, images):
    entry = read_manifest(repository).exits[-1].exit_model
    session = create_session(str(repository / entry.name / str(entry.version) / "model.onnx"))
    return session.run(None, {"images": images})[0]


def infer(module, client, images, parameters=None, outputs=None, binary=True, datatype="FP32"):
    tensor = module.InferInput("images", list(images.shape), datatype)
    if module is httpclient:
        tensor.set_data_from_numpy(images, binary_data=binary)
        requested = [module.InferRequestedOutput(name, binary_data=binary, class_count=k) for name, k in outputs] \
            if outputs else None
    else:
        tensor.set_data_from_numpy(images)
        requested = [module.InferRequestedOutput(name, class_count=k) for name, k in outputs] if outputs else None
    return client.infer(MODEL, [tensor], outputs=requested, parameters=parameters)


@pytest.mark.parametrize(("protocol", "binary"), [("http", False), ("http", True), ("grpc", True)])
def test_infer_answers_per_sample_with_exit_depths(gateway, tiny_repository, images, protocol, binary):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(gateway.http_url if protocol == "http" else gateway.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    full = infer(module, client, images, {"policy": "full"}, binary=binary)
    np.testing.assert_allclose(full.as_numpy("logits"), final_exit_logits(tiny_repository, images), atol=1e-4)
    assert full.as_numpy("exit_depth").tolist() == [8] * 6
    assert full.as_numpy("confidence").shape == (6,)
    first = infer(module, client, images, {"threshold": 0.0}, binary=binary)
    assert first.as_numpy("exit_depth").tolist() == [3] * 6
    fixed = infer(module, client, images, {"policy": "fixed", "exit_depth": 5}, binary=binary)
    assert fixed.as_numpy("exit_depth").tolist() == [5] * 6
    listed = infer(module, client, images, {"threshold": "0.0,0.0,0.0", "score": "margin"}, binary=binary)
    assert listed.as_numpy("exit_depth").tolist() == [3] * 6
    budget = infer(module, client, images, {"policy": "budget", "budget_ms": 10000.0, "threshold": 2.0},
                   binary=binary)
    assert budget.as_numpy("exit_depth").tolist() == [8] * 6
    probs = infer(module, client, images, {"policy": "full"}, outputs=[("probabilities", 0), ("logits", 2)],
                  binary=binary)
    np.testing.assert_allclose(probs.as_numpy("probabilities").sum(axis=1), 1.0, rtol=1e-5)
    top2 = probs.as_numpy("logits")
    assert top2.shape == (6, 2)
    entry = top2[0, 0].decode() if isinstance(top2[0, 0], bytes) else top2[0, 0]
    value, index, label = entry.split(":")
    assert label in ("cat", "dog", "ship") and int(index) == int(np.argmax(full.as_numpy("logits")[0]))


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_http_requests(gateway, tiny_repository, images, algorithm):
    client = httpclient.InferenceServerClient(gateway.http_url)
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer(MODEL, [tensor], parameters={"policy": "full"}, request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("logits"), final_exit_logits(tiny_repository, images), atol=1e-4)
    bad = httpx.post(f"http://{gateway.http_url}/v2/models/{MODEL}/infer", content=b"not gzip",
                     headers={"Content-Encoding": algorithm})
    assert bad.status_code == 400 and algorithm in bad.json()["error"]


def test_raw_uint8_images_are_normalised_by_the_gateway(gateway, tiny_repository):
    manifest = read_manifest(tiny_repository)
    raw = np.random.default_rng(2).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    normalised = ((raw.astype(np.float32) / 255 - np.array(manifest.mean, np.float32)) /
                  np.array(manifest.std, np.float32)).transpose(0, 3, 1, 2).astype(np.float32)
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    result = infer(grpcclient, client, raw, {"policy": "full"}, datatype="UINT8")
    np.testing.assert_allclose(result.as_numpy("logits"), final_exit_logits(tiny_repository, normalised), atol=1e-3)


def test_metadata(gateway):
    client = httpclient.InferenceServerClient(gateway.http_url)
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert meta["parameters"]["exit_depths"] == "3,5,8"
    assert client.get_server_metadata()["name"] == "early-exit-gateway"
    grpc_meta = grpcclient.InferenceServerClient(gateway.grpc_url).get_model_metadata(MODEL)
    assert grpc_meta.inputs[0].name == "images"


def test_classify_endpoint(gateway):
    rng = np.random.default_rng(3)
    big = rng.integers(0, 255, size=(300, 200, 3), dtype=np.uint8)
    small = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    files = [("files", ("big.png", png_bytes(big), "image/png")),
             ("files", ("small.png", png_bytes(small), "image/png"))]
    response = httpx.post(f"http://{gateway.http_url}/v1/classify", files=files, params={"top_k": 2}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["filename"] for r in body["results"]] == ["big.png", "small.png"]
    for result in body["results"]:
        assert result["label"] in ("cat", "dog", "ship") and result["exit_depth"] in (3, 5, 8)
        assert len(result["top_k"]) == 2 and result["top_k"][0]["label"] == result["label"]
    assert body["latency_ms"] > 0
    text = httpx.post(f"http://{gateway.http_url}/v1/classify", files=[("files", ("a.txt", b"hello", "text/plain"))])
    assert text.status_code == 422 and "a.txt" in text.json()["error"]


def _post(gateway, body: bytes, headers=None, model=MODEL):
    return httpx.post(f"http://{gateway.http_url}/v2/models/{model}/infer", content=body,
                      headers=headers or {"Content-Type": "application/json"}, timeout=30)


def _json_request(images, parameters=None, datatype="FP32"):
    request = {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": datatype,
                           "data": images.reshape(-1).tolist()}]}
    if parameters is not None:
        request["parameters"] = parameters
    return json.dumps(request).encode()


@pytest.mark.parametrize(("make_body", "headers", "status", "message"), [
    (lambda x: _json_request(x), None, 404, "unknown model"),
    (lambda x: b"{not json", None, 400, "not valid JSON"),
    (lambda x: _json_request(x[:, :2]), None, 400, "must be FP32 [N, 3, 32, 32]"),
    (lambda x: _json_request(x, datatype="FP64"), None, 400, "must be FP32"),
    (lambda x: json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                        "data": [1.0, 2.0]}]}).encode(), None, 400, "values for shape"),
    (lambda x: _json_request(x[:1]), {"Inference-Header-Content-Length": "999999"}, 400,
     "Inference-Header-Content-Length"),
    (lambda x: json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 12288}}]}).encode() + b"\0" * 100,
     "binary", 400, "binary_data_size"),
    (lambda x: _json_request(np.full_like(x[:1], np.nan)).replace(b"NaN", b"NaN"), None, 422, "NaN"),
    (lambda x: _json_request(x[:1], {"policy": "fastest"}), None, 422, "unknown policy"),
    (lambda x: _json_request(x[:1], {"threshold": "abc"}), None, 422, "threshold must be a number"),
    (lambda x: _json_request(x[:1], {"policy": "budget", "budget_ms": -5}), None, 422, "positive"),
    (lambda x: _json_request(x[:1], {"policy": "fixed", "exit_depth": 4}), None, 422, "available depths"),
    (lambda x: _json_request(np.zeros((80, 3, 32, 32), np.float32)), None, 413, "limit"),
    (lambda x: _json_request(np.zeros((1, 3, 32, 32), np.float32)) + b" " * (1 << 20), None, 413, "exceeds"),
])
def test_bad_http_input_gets_a_clear_error(gateway, images, make_body, headers, status, message):
    body = make_body(images)
    if headers == "binary":
        headers = {"Inference-Header-Content-Length": str(len(body) - 100)}
    model = "nope" if status == 404 else MODEL
    response = _post(gateway, body, headers, model)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_bad_input_leaves_the_server_healthy_and_metrics_count_it(gateway, images):
    client = httpclient.InferenceServerClient(gateway.http_url)
    with pytest.raises(InferenceServerException, match="unknown output"):
        client.infer(MODEL, [_input(images)], outputs=[httpclient.InferRequestedOutput("embeddings")])
    assert infer(httpclient, client, images).as_numpy("exit_depth").shape == (6,)
    metrics = httpx.get(f"http://{gateway.http_url}/metrics").text
    assert 'gateway_requests_total{outcome="error",protocol="http"}' in metrics
    assert "gateway_exits_total" in metrics and "gateway_request_latency_seconds_bucket" in metrics
    assert "gateway_queue_depth" in metrics


def _input(images):
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return tensor


@pytest.mark.parametrize(("model", "parameters", "code"), [
    ("nope", None, grpc.StatusCode.NOT_FOUND),
    (MODEL, {"policy": "fastest"}, grpc.StatusCode.INVALID_ARGUMENT),
    (MODEL, {"budget_ms": "soon"}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_grpc_input_gets_the_matching_code(gateway, images, model, parameters, code):
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    tensor = grpcclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    with pytest.raises(InferenceServerException) as error:
        client.infer(model, [tensor], parameters=parameters)
    assert error.value.status() == f"StatusCode.{code.name}"
    wrong = grpcclient.InferInput("images", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match="must be FP32"):
        client.infer(MODEL, [wrong])


def _queue_depth(gateway) -> float:
    values = re.findall(r"^gateway_queue_depth\{[^}]*\} (\S+)$", gateway.metrics(), re.M)  # one per model
    assert values
    return sum(map(float, values))


def test_graceful_shutdown_finishes_requests_in_flight(tiny_repository, images, tmp_path):
    """SIGTERM while requests over HTTP and gRPC are in the cascade: all answer, then exit 0.

    One sample per backend call on one worker, and every sample through all three
    stages, keeps each request in flight for many calls, so the state where every
    request has entered the cascade and none has finished lasts long enough to see.
    """
    log = tmp_path / "gateway.log"
    process = GatewayProcess(tiny_repository, "--workers", "1", "--max-batch-size", "1", "--max-wait-ms", "0",
                             log_path=log)
    batch = np.resize(images, (128, *images.shape[1:]))
    requests = 8
    try:
        depths = _send_then_terminate(process, batch, requests)
        # Wait for the exit the first SIGTERM started: a second one would cut the shutdown short.
        status = process.process.wait(timeout=60)
    finally:
        process.stop()  # already exited unless the test failed
    assert status == 0
    assert all(d.tolist() == [8] * len(batch) for d in depths)
    text = log.read_text()
    assert "finishing in-flight requests" in text and "stopped" in text


def _send_then_terminate(process, batch, requests):
    """Send `requests` concurrent requests, SIGTERM once all are in the cascade; their exit depths."""

    def call(position):
        module = httpclient if position % 2 else grpcclient
        client = module.InferenceServerClient(process.http_url if module is httpclient else process.grpc_url)
        result = infer(module, client, batch, {"threshold": 2.0})  # never confident: every stage runs
        return result.as_numpy("exit_depth")

    with ThreadPoolExecutor(requests) as pool:
        futures = [pool.submit(call, position) for position in range(requests)]
        # More samples queued than all requests but one could hold: every request is in the cascade.
        deadline = time.monotonic() + 60
        while _queue_depth(process) <= (requests - 1) * len(batch):
            assert time.monotonic() < deadline and not any(f.done() for f in futures), "requests never all in flight"
        process.process.send_signal(signal.SIGTERM)
        return [future.result(timeout=60) for future in futures]


def test_bad_settings_are_one_line_errors(tiny_repository):
    from .conftest import run_module

    result = run_module("serving", "--model-repository", str(tiny_repository), "--workers", "0")
    assert result.returncode == 2 and "invalid setting workers" in result.stderr
    result = run_module("serving", "--model-repository", "/nowhere")
    assert result.returncode == 2 and "no manifest.json in /nowhere" in result.stderr
    result = run_module("serving", "--model-repository", str(tiny_repository), env={"EE_BACKEND": "tensorflow"})
    assert result.returncode == 2 and "EE_BACKEND" in result.stderr


def test_settings_take_flags_then_environment_then_defaults(monkeypatch):
    from serving.settings import load_settings

    monkeypatch.setenv("EE_WORKERS", "5")
    monkeypatch.setenv("EE_HTTP_PORT", "9000")
    monkeypatch.setenv("EE_ACCESS_LOG", "true")
    settings = load_settings(["--workers", "3", "--no-access-log", "--grpc-port", "-1"])
    assert (settings.workers, settings.http_port, settings.grpc_port) == (3, 9000, -1)
    assert settings.access_log is False and settings.max_batch_size == 64


def test_the_example_client_runs_as_written(gateway, imagefolder):
    import subprocess
    import sys

    from .conftest import REPO_ROOT

    result = subprocess.run([sys.executable, "examples/query_gateway.py", "--http", gateway.http_url, "--grpc",
                             gateway.grpc_url, "--data", str(imagefolder), "--count", "6"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"model {MODEL}\n" in result.stdout  # no --model: the gateway's first ready model
    assert "HTTP: exit depths" in result.stdout and "gRPC: accuracy" in result.stdout
    assert result.stdout.count("classify: image") == 4
