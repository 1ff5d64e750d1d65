"""The front ends under hostile input (issue 25): strict validation, generic internal errors,
image-bomb limits on /v1/classify, JSON health bodies (tritonclient and KServe's own clients),
security options, and bounded fuzzing, all against real gateway processes on the tiny model."""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from benchmarks.triton_launcher import free_port
from common.paths import REPO_ROOT

from .conftest import GatewayProcess, png_bytes

MODEL = "mwresnet8_3"
API_KEY = "s3cret-key"
MAX_CONNECTIONS = 8
BATCH_LIMIT = 128


@pytest.fixture(scope="module")
def gateway(tiny_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening") / "gateway.log"
    process = GatewayProcess(tiny_repository, "--max-body-mb", "2", "--max-request-batch", str(BATCH_LIMIT),
                             "--max-image-pixels", "1000000", "--max-request-pixels", "2000000",
                             "--max-image-mb", "0.5", log_path=log)
    process.log_file = log
    yield process
    assert process.stop() == 0


def _post(gateway, body: bytes, headers=None, path=f"/v2/models/{MODEL}/infer"):
    return httpx.post(f"http://{gateway.http_url}{path}", content=body,
                      headers=headers or {"Content-Type": "application/json"}, timeout=30)


def _valid_request(**changes) -> dict:
    request = {"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32",
                           "data": [0.0] * 3072}]}
    request.update(changes)
    return request


def _input(**changes) -> dict:
    spec = {"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}
    spec.update(changes)
    return spec


def _body(document) -> bytes:
    return json.dumps(document).encode()


NESTED = b"[" * 1000 + b"]" * 1000

# (body, headers, status, words the message must contain): the fuzzing findings of issue 25 and their kin.
MALFORMED = {
    "parameters not an object": (_body(_valid_request(parameters=[1, 2])), None, 400, "'parameters'"),
    "parameters a string": (_body(_valid_request(parameters="fast")), None, 400, "'parameters'"),
    "input parameters not an object": (_body(_valid_request(inputs=[_input(parameters=[])])), None, 400,
                                       "inputs[0].parameters"),
    "outputs a number": (_body(_valid_request(outputs=5)), None, 400, "'outputs'"),
    "output not an object": (_body(_valid_request(outputs=[5])), None, 400, "outputs[0]"),
    "output parameters not an object": (_body(_valid_request(outputs=[{"name": "logits", "parameters": 3}])),
                                        None, 400, "outputs[0].parameters"),
    "bool in shape": (_body(_valid_request(inputs=[_input(shape=[True, 3, 32, 32])])), None, 400, "shape"),
    "negative shape": (_body(_valid_request(inputs=[_input(shape=[-1, 3, 32, 32])])), None, 400, "shape"),
    "float shape": (_body(_valid_request(inputs=[_input(shape=[1.0, 3, 32, 32])])), None, 400, "shape"),
    "shape overflowing int64": (_body(_valid_request(inputs=[_input(shape=[4611686018427387904, 4])])), None,
                                400, "shape"),
    "shape of 2**64": (_body(_valid_request(inputs=[_input(shape=[2 ** 64, 3, 32, 32])])), None, 400, "shape"),
    "zero in an overflowing shape": (_body(_valid_request(inputs=[_input(shape=[0, 2 ** 63, 2 ** 63])])), None,
                                     400, "shape"),
    "datatype not a string": (_body(_valid_request(inputs=[_input(datatype=["FP32"])])), None, 400, "datatype"),
    "unknown datatype": (_body(_valid_request(inputs=[_input(datatype="FP128")])), None, 400, "datatype"),
    "name not a string": (_body(_valid_request(inputs=[_input(name=7)])), None, 400, "inputs[0]"),
    "id not a string": (_body(_valid_request(id=[1])), None, 400, "'id'"),
    "binary_data_size a bool": (_body(_valid_request(inputs=[_input(parameters={"binary_data_size": True})])),
                                None, 400, "binary_data_size"),
    "exit_depth Infinity": (b'{"inputs": [], "parameters": {"policy": "fixed", "exit_depth": Infinity}}', None,
                            400, "exit_depth"),
    "budget_ms NaN": (b'{"inputs": [], "parameters": {"budget_ms": NaN}}', None, 400, "budget_ms"),
    "exit_depth a list": (_body(_valid_request(parameters={"policy": "fixed", "exit_depth": [3]})), None, 422,
                          "exit_depth"),
    "classification a string": (_body(_valid_request(outputs=[{"name": "logits",
                                                                "parameters": {"classification": "2"}}])),
                                None, 422, "classification"),
    "JSON nested 1,000 deep in inputs": (b'{"inputs": ' + NESTED + b"}", None, 400, "inputs[0]"),
    "JSON nested 1,000 deep in id": (b'{"inputs": [], "id": ' + NESTED + b"}", None, 400, "'id'"),
    "JSON nested 1,000 deep in data": (_body(_valid_request(inputs=[_input(datatype="BYTES", shape=[1])]))
                                       .replace(b"[0.0" + b", 0.0" * 3071 + b"]", NESTED), None, 400, "data"),
    "JSON nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, None, 400, "JSON"),
    "non-ASCII digits in the header length": (_body(_valid_request()),
                                              {"Inference-Header-Content-Length": "\u0661\u0662"}, 400,
                                              "Inference-Header-Content-Length"),
    "superscript digit in the header length": (_body(_valid_request()),
                                               {"Inference-Header-Content-Length": "\u00b2"}, 400,
                                               "Inference-Header-Content-Length"),
    "negative header length": (_body(_valid_request()), {"Inference-Header-Content-Length": "-5"}, 400,
                               "Inference-Header-Content-Length"),
    "invalid UTF-8": (b'{"inputs": "\xff\xfe"}', None, 400, "JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_4xx_naming_the_field_on_a_connection_that_stays_open(gateway, case):
    body, headers, status, words = MALFORMED[case]
    connection = http.client.HTTPConnection(*gateway.http_url.split(":"), timeout=30)
    try:
        headers = {"Content-Type": "application/json", **(headers or {})}
        connection.request("POST", f"/v2/models/{MODEL}/infer", body=body,
                           headers={k: v.encode() if not v.isascii() else v for k, v in headers.items()})
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == status, answer
        assert words in answer["error"], answer
        # The same connection answers the next request: nothing was dropped.
        connection.request("GET", "/v2/health/ready")
        follow = connection.getresponse()
        assert follow.status == 200 and json.loads(follow.read()) == {"ready": True}
    finally:
        connection.close()


def test_errors_are_counted_in_the_metrics(gateway):
    assert _post(gateway, _body(_valid_request(outputs=5))).status_code == 400
    metrics = gateway.metrics()
    assert 'gateway_errors_total{error="InvalidInput",protocol="http"}' in metrics


def _strict_json(text: bytes):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_outputs_are_valid_json(gateway):
    """Huge finite inputs overflow the network to inf/NaN logits: the JSON answer writes them as null
    (KServe's convention, which numpy reads back as NaN), the binary answer keeps them exactly."""
    images = np.full((2, 3, 32, 32), 3e38, np.float32)
    images[1] = 0.0
    request = _valid_request(inputs=[_input(shape=[2, 3, 32, 32], data=images.reshape(-1).tolist())],
                             parameters={"policy": "full"})
    response = _post(gateway, _body(request))
    assert response.status_code == 200, response.text
    document = _strict_json(response.content)
    logits = {o["name"]: o for o in document["outputs"]}["logits"]["data"]
    client = httpclient.InferenceServerClient(gateway.http_url)
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    binary = client.infer(MODEL, [tensor], parameters={"policy": "full"}).as_numpy("logits").reshape(-1)
    assert not np.isfinite(binary[:3]).all(), "the overflowing input should give non-finite logits"
    assert [value is None for value in logits] == [not math.isfinite(value) for value in binary]
    assert np.isfinite(binary[3:]).all()
    parsed = httpclient.InferenceServerClient(gateway.http_url)
    tensor.set_data_from_numpy(images, binary_data=False)
    through_json = parsed.infer(MODEL, [tensor], parameters={"policy": "full"},
                                outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)])
    assert np.isnan(through_json.as_numpy("logits")[0]).any()


# -- internal errors: generic, logged with a request id, counted --------------------------------------------

def test_internal_errors_are_generic_logged_and_counted(tiny_repository, caplog):
    """An exception no handler expects (here: a bug simulated inside the dataplane of an in-process
    gateway on the tiny model) is a 500 / INTERNAL with a request id and nothing internal."""
    from starlette.testclient import TestClient

    from serving.app import Gateway
    from serving.settings import Settings

    gateway = Gateway(Settings(model_repository=tiny_repository, grpc_port=-1))

    async def broken(*args, **kwargs):
        raise RuntimeError(f"backend at 10.0.0.7:8001 failed for {MODEL}_segment_2 object at 0xdeadbeef")

    gateway.dataplane.infer = broken
    with caplog.at_level(logging.ERROR), TestClient(gateway.http_app) as client:
        response = client.post(f"/v2/models/{MODEL}/infer", content=_body(_valid_request()),
                               headers={"X-Request-ID": "req-42"})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error (request id req-42)"}
        for leak in ("RuntimeError", "10.0.0.7", "segment", "0xdeadbeef"):
            assert leak not in response.text
        assert client.get("/v2/health/ready").json() == {"ready": True}
        metrics = client.get("/metrics").text
    assert 'gateway_errors_total{error="InternalError",protocol="http"} 1.0' in metrics
    logged = [r for r in caplog.records if r.getMessage() == "internal error"]
    assert logged and logged[0].fields["request_id"] == "req-42" and logged[0].exc_info

    # gRPC: the same bug answers INTERNAL (never UNKNOWN with the exception's text).
    from serving.grpc_api import start_grpc_server

    async def grpc_call():
        port = free_port()
        server = await start_grpc_server(gateway.dataplane, "127.0.0.1", port, 1 << 20)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                request = service_pb2.ModelInferRequest(model_name=MODEL)
                try:
                    await stub.ModelInfer(request, metadata=(("x-request-id", "abc123"),))
                except grpc.aio.AioRpcError as error:
                    return error.code(), error.details()
        finally:
            await server.stop(None)

    code, details = asyncio.run(grpc_call())
    assert code == grpc.StatusCode.INTERNAL and details == "internal error (request id abc123)"
    assert 'gateway_errors_total{error="InternalError",protocol="grpc"} 1.0' in gateway.metrics.render().decode()


# -- gRPC validation ----------------------------------------------------------------------------------------

def _grpc_infer(gateway, request: service_pb2.ModelInferRequest):
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def _grpc_request(shape=(1, 3, 32, 32), datatype="FP32", parameters=None, raw=None) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(raw if raw is not None else np.zeros(3072, np.float32).tobytes())
    for name, value in (parameters or {}).items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], field, value)
    return request


@pytest.mark.parametrize(("request_", "words"), [
    (_grpc_request(parameters={"policy": "fixed", "exit_depth": math.inf}), "exit_depth"),
    (_grpc_request(parameters={"budget_ms": math.nan}), "budget_ms"),
    (_grpc_request(shape=(-1, 3, 32, 32)), "shape"),
    (_grpc_request(shape=(2 ** 62, 4)), "shape"),
    (_grpc_request(shape=(0, 2 ** 62, 2 ** 62)), "shape"),
    (_grpc_request(datatype="FP128"), "datatype"),
    (_grpc_request(raw=b"\0" * 7), "bytes"),
], ids=["exit_depth inf", "budget NaN", "negative shape", "overflowing shape", "zero and overflow", "datatype",
        "short raw"])
def test_malformed_grpc_requests_are_invalid_argument_naming_the_field(gateway, request_, words):
    code, details = _grpc_infer(gateway, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert words in details


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "ServerReady"])
@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\xff\x01"])
def test_undecodable_grpc_messages_are_invalid_argument(gateway, method, payload):
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # raw bytes, no serializer
        with pytest.raises(grpc.RpcError) as error:
            call(payload, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("request is not a valid inference.")
    assert "Error" not in error.value.details()


def test_grpc_methods_the_gateway_lacks_are_unimplemented(gateway):
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.CudaSharedMemoryStatus(service_pb2.CudaSharedMemoryStatusRequest(), timeout=30)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- /v1/classify: decoding in a pool, within limits ---------------------------------------------------------

def _bomb_png(side: int = 7999) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _classify(gateway, files, **params):
    return httpx.post(f"http://{gateway.http_url}/v1/classify", files=files, params=params, timeout=60)


def test_image_bombs_are_refused_from_their_headers_while_health_answers(gateway):
    """100 copies of a 7999x7999 1-bit PNG (a few KB each, 64 megapixels each when decoded): refused
    from their headers before any decoding, health answering meanwhile."""
    bomb = _bomb_png()
    assert len(bomb) < 20_000
    files = [("files", (f"bomb{i}.png", bomb, "image/png")) for i in range(100)]
    health = []

    def poll_health(stop_after: float):
        while time.monotonic() < stop_after:
            health.append(httpx.get(f"http://{gateway.http_url}/v2/health/ready", timeout=10).status_code)

    with ThreadPoolExecutor(2) as pool:
        poller = pool.submit(poll_health, time.monotonic() + 1.0)
        response = _classify(gateway, files)
        poller.result()
    assert response.status_code == 413, response.text
    assert "bomb0.png" in response.json()["error"] and "7999x7999" in response.json()["error"]
    assert health and set(health) == {200}


def test_classify_applies_the_request_image_limit(gateway):
    image = png_bytes(np.zeros((8, 8, 3), np.uint8))
    files = [("files", (f"{i}.png", image, "image/png")) for i in range(BATCH_LIMIT + 1)]
    response = _classify(gateway, files)
    assert response.status_code == 413 and str(BATCH_LIMIT) in response.json()["error"]
    assert _classify(gateway, files[:BATCH_LIMIT]).status_code == 200


def test_classify_limits_pixels_per_request_and_bytes_per_file(gateway):
    rng = np.random.default_rng(0)
    image = png_bytes(np.zeros((900, 900, 3), np.uint8))  # 0.81 Mpx: under the image limit, 3 over the request's
    files = [("files", (f"{i}.png", image, "image/png")) for i in range(3)]
    response = _classify(gateway, files)
    assert response.status_code == 413 and "pixels in one upload" in response.json()["error"]
    noisy = png_bytes(rng.integers(0, 256, size=(700, 700, 3), dtype=np.uint8))  # ~1.5 MB > 0.5 MB per file
    response = _classify(gateway, [("files", ("noisy.png", noisy, "image/png"))])
    assert response.status_code == 413 and "noisy.png" in response.json()["error"]


def test_classify_refuses_exotic_formats_and_records_latency(gateway):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    response = _classify(gateway, [("files", ("x.tiff", buffer.getvalue(), "image/tiff"))])
    assert response.status_code == 422 and "x.tiff" in response.json()["error"]
    ok = _classify(gateway, [("files", ("ok.png", png_bytes(np.zeros((40, 60, 3), np.uint8)), "image/png"))])
    assert ok.status_code == 200
    metrics = gateway.metrics()
    assert 'gateway_request_latency_seconds_count{protocol="classify"}' in metrics
    bad_query = _classify(gateway, [("files", ("ok.png", png_bytes(np.zeros((8, 8, 3), np.uint8)), "image/png"))],
                          budget_ms="soon")
    assert bad_query.status_code == 422 and "budget_ms" in bad_query.json()["error"]


# -- health bodies, with tritonclient and KServe's own clients -----------------------------------------------

def test_health_endpoints_answer_json_bodies(gateway):
    base = f"http://{gateway.http_url}"
    assert httpx.get(f"{base}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{base}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{base}/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert httpx.get(f"{base}/v2/models/{MODEL}/versions/1/ready").json()["ready"] is True
    assert httpx.get(f"{base}/v2/models/nope/ready").status_code == 404
    client = httpclient.InferenceServerClient(gateway.http_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    grpc_client = grpcclient.InferenceServerClient(gateway.grpc_url)
    assert grpc_client.is_server_ready() and grpc_client.is_model_ready(MODEL)


KSERVE_CLIENTS = """
import asyncio, json, sys
import numpy as np
import kserve

http_url, grpc_url, model = sys.argv[1:4]
images = np.random.default_rng(4).standard_normal((3, 3, 32, 32)).astype(np.float32)


def request(binary):
    tensor = kserve.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return kserve.InferRequest(model_name=model, infer_inputs=[tensor], parameters={"policy": "full"})


def summary(checks, response):
    outputs = {output.name: output for output in response.outputs}
    return {"checks": checks, "exit_depth": outputs["exit_depth"].as_numpy().tolist(),
            "logits_shape": list(outputs["logits"].as_numpy().shape)}


async def main():
    rest = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=30))
    base = "http://" + http_url
    try:
        checks = [await rest.is_server_live(base), await rest.is_server_ready(base),
                  await rest.is_model_ready(base, model)]
        rest_result = summary(checks, await rest.infer(base, request(False), model_name=model))
    finally:
        await rest.close()
    client = kserve.InferenceGRPCClient(grpc_url, timeout=30)
    try:
        checks = [await client.is_server_live(), await client.is_server_ready(), await client.is_model_ready(model)]
        grpc_result = summary(checks, await client.infer(request(True)))
    finally:
        await client.close()
    print(json.dumps({"rest": rest_result, "grpc": grpc_result}))


asyncio.run(main())
"""


def test_kserve_clients_work_against_the_gateway(gateway):
    """KServe's own REST and gRPC clients (in a process of their own: their generated protobuf module
    registers the same `inference` package as tritonclient's, so the two cannot share a process)."""
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("kserve is not installed (the dev extra pins it)")
    result = subprocess.run([sys.executable, "-c", KSERVE_CLIENTS, gateway.http_url, gateway.grpc_url, MODEL],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for protocol in ("rest", "grpc"):
        assert answers[protocol]["checks"] == [True, True, True], answers
        assert answers[protocol]["exit_depth"] == [8, 8, 8]
        assert answers[protocol]["logits_shape"] == [3, 3]


# -- OpenAPI --------------------------------------------------------------------------------------------------

def test_openapi_describes_the_infer_and_classify_bodies(gateway):
    document = httpx.get(f"http://{gateway.http_url}/openapi.json").json()
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    schema = infer["application/json"]["schema"]
    assert schema["required"] == ["inputs"] and "shape" in schema["properties"]["inputs"]["items"]["properties"]
    assert "application/octet-stream" in infer
    classify = document["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert classify["schema"]["properties"]["files"]["type"] == "array"


# -- security options -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured_gateway(tiny_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("secured") / "gateway.log"
    process = GatewayProcess(tiny_repository, "--api-key", API_KEY, "--no-docs", "--read-timeout-s", "3",
                             "--max-connections", str(MAX_CONNECTIONS), log_path=log)
    process.log_file = log
    yield process
    assert process.stop() == 0


def test_api_key_guards_inference_and_metrics_but_not_health(secured_gateway):
    base = f"http://{secured_gateway.http_url}"
    body = _body(_valid_request())
    assert httpx.get(f"{base}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{base}/v2/health/live").status_code == 200
    assert httpx.get(f"{base}/v2/models/{MODEL}/ready").status_code == 200
    for method, path in (("POST", f"/v2/models/{MODEL}/infer"), ("GET", "/metrics"), ("GET", f"/v2/models/{MODEL}"),
                         ("POST", "/v1/classify")):
        refused = httpx.request(method, base + path, content=body)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        wrong = httpx.request(method, base + path, content=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
        assert httpx.post(f"{base}/v2/models/{MODEL}/infer", content=body, headers=headers).status_code == 200
        assert httpx.get(f"{base}/metrics", headers=headers).status_code == 200
    client = httpclient.InferenceServerClient(secured_gateway.http_url)
    assert client.is_server_ready()
    with pytest.raises(InferenceServerException):
        client.get_model_metadata(MODEL)
    assert client.get_model_metadata(MODEL, headers={"Authorization": f"Bearer {API_KEY}"})["name"] == MODEL

    grpc_client = grpcclient.InferenceServerClient(secured_gateway.grpc_url)
    assert grpc_client.is_server_ready() and grpc_client.is_model_ready(MODEL)
    tensor = grpcclient.InferInput("images", [1, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer(MODEL, [tensor])
    assert error.value.status() == "StatusCode.UNAUTHENTICATED"
    result = grpc_client.infer(MODEL, [tensor], headers={"authorization": f"Bearer {API_KEY}"})
    assert result.as_numpy("exit_depth").shape == (1,)
    metrics = httpx.get(f"{base}/metrics", headers={"X-API-Key": API_KEY}).text
    assert 'gateway_errors_total{error="Unauthenticated",protocol="grpc"}' in metrics


def test_docs_can_be_switched_off_and_no_server_version_is_sent(secured_gateway, gateway):
    base = f"http://{secured_gateway.http_url}"
    assert httpx.get(f"{base}/docs").status_code == 404
    assert httpx.get(f"{base}/openapi.json").status_code == 404
    for process in (secured_gateway, gateway):
        response = httpx.get(f"http://{process.http_url}/v2/health/ready")
        assert "server" not in response.headers


def test_slow_clients_are_disconnected(secured_gateway):
    """A client that trickles its request (headers or body) is cut off after --read-timeout-s (3 s
    here), while a normal client is served meanwhile."""
    host, port = secured_gateway.http_url.split(":")
    slow_headers = socket.create_connection((host, int(port)), timeout=30)
    slow_body = socket.create_connection((host, int(port)), timeout=30)
    try:
        slow_headers.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
        slow_body.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
                          "Content-Length: 1000\r\n\r\n{".encode())  # 999 bytes short
        assert httpx.get(f"http://{secured_gateway.http_url}/v2/health/ready").status_code == 200
        started = time.monotonic()
        for sock in (slow_headers, slow_body):
            received = b""
            while chunk := sock.recv(4096):  # until the server closes the connection
                received += chunk
            assert b"200 OK" not in received
        assert time.monotonic() - started < 25  # closed by the 3 s read timeout, not by the 30 s socket timeout
    finally:
        slow_headers.close()
        slow_body.close()
    assert "took too long to arrive" in secured_gateway.log_file.read_text()


def test_connections_beyond_the_limit_are_answered_503(secured_gateway):
    """--max-connections: with the limit's worth of connections open, one more request is refused at
    once (503), and served again when they close (they are idle: well within the 3 s read timeout)."""
    host, port = secured_gateway.http_url.split(":")
    url = f"http://{secured_gateway.http_url}/v2/health/ready"
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(MAX_CONNECTIONS)]
    try:
        assert httpx.get(url, timeout=10).status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while httpx.get(url, timeout=10).status_code != 200:  # the server notices the closed sockets
        assert time.monotonic() < deadline


def _live_channel(url: str) -> grpc.Channel:
    """A gRPC channel on its own connection (no subchannel shared with other channels), connected."""
    channel = grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)])
    service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
    return channel


@pytest.fixture
def limited_gateway(tiny_repository):
    """Its own gateway: connections other tests leave open would count against the limit."""
    process = GatewayProcess(tiny_repository, "--read-timeout-s", "3", "--max-connections", str(MAX_CONNECTIONS))
    yield process
    assert process.stop() == 0


def test_grpc_connections_beyond_the_limit_fail_and_slow_handshakes_are_cut(limited_gateway):
    """--max-connections applies to gRPC too (grpc.max_allowed_incoming_connections), and --read-timeout-s
    bounds a gRPC connection's set-up (grpc.server_handshake_timeout_ms): a client that connects and sends
    nothing is disconnected."""
    channels = [_live_channel(limited_gateway.grpc_url) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = grpc.insecure_channel(limited_gateway.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)])
        with pytest.raises(grpc.RpcError) as error:
            service_pb2_grpc.GRPCInferenceServiceStub(extra).ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
        assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        extra.close()
    finally:
        for channel in channels:
            channel.close()
    deadline = time.monotonic() + 30
    while True:  # served again once the connections are gone
        try:
            _live_channel(limited_gateway.grpc_url).close()
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    host, port = limited_gateway.grpc_url.split(":")
    silent = socket.create_connection((host, int(port)), timeout=30)
    try:
        started = time.monotonic()
        while silent.recv(4096):  # the server's HTTP/2 settings, then nothing until it closes
            pass
        assert time.monotonic() - started < 25  # the 3 s handshake timeout, not the socket's 30 s
    finally:
        silent.close()


@pytest.fixture(scope="module")
def manifest_shape(tiny_repository):
    from common.manifest import read_manifest

    return tuple(read_manifest(tiny_repository).input.shape)


def test_the_default_grpc_concurrency_limit_follows_the_admission_bound():
    from serving.app import grpc_limits
    from serving.grpc_api import RPC_HEADROOM, concurrent_rpc_limit
    from serving.settings import load_settings

    assert concurrent_rpc_limit(600) == 600 + RPC_HEADROOM and concurrent_rpc_limit(None) is None
    limits = grpc_limits(load_settings(["--max-connections", "50", "--read-timeout-s", "7"]), 600)
    assert limits.max_concurrent_rpcs == 600 + RPC_HEADROOM and limits.max_connections == 50
    options = dict(limits.options())
    assert options["grpc.max_allowed_incoming_connections"] == 50
    assert options["grpc.server_handshake_timeout_ms"] == 7000
    assert grpc_limits(load_settings(["--grpc-max-concurrent-rpcs", "5"]), 600).max_concurrent_rpcs == 5


def _self_signed_certificate(directory) -> tuple:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


def test_tls_for_http_and_grpc(tiny_repository, tmp_path):
    cert, key = _self_signed_certificate(tmp_path)
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "serving", "--model-repository", str(tiny_repository),
                                    "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                                    "--tls-cert", str(cert), "--tls-key", str(key)], cwd=REPO_ROOT, stdout=output,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        context = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"https://127.0.0.1:{http_port}/v2/health/ready", verify=context).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)  # polling the health endpoint until the gateway is up
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready")
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", ssl=True,
                                                  ssl_context_factory=lambda: context)
        tensor = httpclient.InferInput("images", [1, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        assert client.infer(MODEL, [tensor]).as_numpy("exit_depth").shape == (1,)
        grpc_client = grpcclient.InferenceServerClient(f"localhost:{grpc_port}", ssl=True,
                                                       root_certificates=str(cert))
        assert grpc_client.is_server_ready()
        grpc_tensor = grpcclient.InferInput("images", [1, 3, 32, 32], "FP32")
        grpc_tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        assert grpc_client.infer(MODEL, [grpc_tensor]).as_numpy("exit_depth").shape == (1,)
    finally:
        process.terminate()
        process.wait(timeout=60)


# -- fuzzing: hypothesis bodies for the JSON and binary paths, malformed gRPC ------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)), max_leaves=12)
FIELD_NAMES = ["name", "shape", "datatype", "data", "parameters", "id", "outputs", "inputs", "binary_data_size",
               "classification", "binary_data", "policy", "threshold", "budget_ms", "exit_depth", "score"]
DATATYPE_VALUES = st.sampled_from(["FP32", "UINT8", "BYTES", "FP64", "INT64", "BOOL", "FP16", "", "fp32"])
SHAPES = st.one_of(st.lists(st.integers(min_value=-2, max_value=2 ** 65), max_size=5),
                   st.sampled_from([[1, 3, 32, 32], [1, 32, 32, 3], [2, 3, 32, 32], [0, 3, 32, 32]]), JSON_VALUES)


@st.composite
def infer_documents(draw):
    """Inference requests near the valid one, with any field replaced by any JSON value."""
    shape = draw(SHAPES)
    spec = {"name": draw(st.sampled_from(["images", "x", ""])), "shape": shape, "datatype": draw(DATATYPE_VALUES)}
    if draw(st.booleans()):
        count = math.prod(shape) if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 4096
                                                                      for d in shape) else 3
        spec["data"] = draw(st.lists(st.one_of(st.floats(width=32), st.integers(-300, 300)),
                                     min_size=min(count, 3072), max_size=min(count, 3072)))
    else:
        spec["data"] = draw(JSON_VALUES)
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=3)):
        spec[name] = draw(JSON_VALUES)
    document = {"inputs": [spec] if draw(st.booleans()) else draw(JSON_VALUES)}
    for name in draw(st.lists(st.sampled_from(["parameters", "outputs", "id"]), max_size=3)):
        document[name] = draw(st.one_of(
            JSON_VALUES, st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=4),
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "exit_depth", "nope"]),
                                            "parameters": JSON_VALUES}), max_size=2)))
    return document


FUZZ_SETTINGS = settings(max_examples=250, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                HealthCheck.data_too_large])


def _no_5xx(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.headers.get("content-type", "").startswith("application/json"):
        _strict_json(response.content)


@FUZZ_SETTINGS
@given(document=infer_documents(), non_finite=st.booleans())
def test_fuzzed_json_infer_bodies_never_get_5xx(gateway, document, non_finite):
    body = json.dumps(document, allow_nan=True).encode()
    if non_finite:
        body = body.replace(b"0.0", b"NaN", 1).replace(b"1.0", b"Infinity", 1)
    with httpx.Client(timeout=30) as client:
        _no_5xx(client.post(f"http://{gateway.http_url}/v2/models/{MODEL}/infer", content=body))


@FUZZ_SETTINGS
@given(document=infer_documents(), header=st.one_of(st.integers(-5, 5000).map(str), st.text(max_size=4)),
       binary=st.binary(max_size=13000), encoding=st.sampled_from([None, "gzip", "deflate", "br"]))
def test_fuzzed_binary_infer_bodies_never_get_5xx(gateway, document, header, binary, encoding):
    prefix = json.dumps(document).encode()
    headers = {"Inference-Header-Content-Length": header if header.isascii() and header.isprintable()
               else str(len(prefix))}
    if encoding:
        headers["Content-Encoding"] = encoding
    with httpx.Client(timeout=30) as client:
        _no_5xx(client.post(f"http://{gateway.http_url}/v2/models/{MODEL}/infer", content=prefix + binary,
                            headers=headers))


PARAMETER_VALUES = st.one_of(st.booleans(), st.integers(-(2 ** 63), 2 ** 63 - 1), st.floats(), st.text(max_size=8))


@st.composite
def grpc_requests(draw):
    request = service_pb2.ModelInferRequest(model_name=draw(st.sampled_from([MODEL, "nope", ""])),
                                            model_version=draw(st.sampled_from(["", "1", "2"])), id=draw(st.text()))
    for _ in range(draw(st.integers(0, 2))):
        spec = request.inputs.add(name=draw(st.sampled_from(["images", "x"])), datatype=draw(DATATYPE_VALUES),
                                  shape=draw(st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=5)))
        if draw(st.booleans()):
            spec.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=40)))
            spec.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2 ** 32 - 1), max_size=40)))
    if draw(st.booleans()):
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=13000), max_size=2)))
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=3)):
        value = draw(PARAMETER_VALUES)
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], field, value)
    for name in draw(st.lists(st.sampled_from(["logits", "exit_depth", "nope"]), max_size=2)):
        output = request.outputs.add(name=name)
        output.parameters["classification"].int64_param = draw(st.integers(-3, 5))
    return request


@pytest.fixture(scope="module")
def grpc_stub(gateway):
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel), channel


@FUZZ_SETTINGS
@given(request=grpc_requests())
def test_fuzzed_grpc_requests_never_get_unknown_or_internal(grpc_stub, request):
    stub, _ = grpc_stub
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), error.details()
        assert "Error" not in error.details() and "Exception" not in error.details(), error.details()


# -- schemathesis on the OpenAPI document ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def openapi_schema(gateway):
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_url(f"http://{gateway.http_url}/openapi.json", timeout=30)
    schema.base_url = f"http://{gateway.http_url}"
    return schema


def test_schemathesis_finds_no_5xx(openapi_schema):
    """Every operation of the OpenAPI document, requests generated from its schemas (bodies included);
    the model's path parameter is the served model most of the time, so the infer and classify bodies
    are reached, not only 404s."""
    operations = [result.ok() for result in openapi_schema.get_all_operations()]
    assert {"/v2/models/{name}/infer", "/v1/classify"} <= {operation.path for operation in operations}
    statuses = []
    for operation in operations:
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(), served=st.integers(0, 3))
        def call(case, served):
            if "name" in (case.path_parameters or {}) and served:
                case.path_parameters["name"] = MODEL
            response = case.call(base_url=openapi_schema.base_url, timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

        call()
    assert 200 in statuses and any(400 <= status < 500 for status in statuses)


def test_a_504_for_the_clients_own_expired_timeout_is_not_a_fuzz_finding(gateway):
    """The fuzz run's one expected 5xx: a request whose own `timeout` (1 microsecond) passed is answered
    504 DeadlineExceeded (gRPC: DEADLINE_EXCEEDED), which the fuzzer does not count as a finding."""
    from benchmarks.fuzz import own_timeout_expired

    body = json.dumps({**_valid_request(), "parameters": {"timeout": 1}}).encode()
    answer = _post(gateway, body)
    assert answer.status_code == 504 and "deadline" in answer.json()["error"]
    assert own_timeout_expired(504, answer.content, body, {"Content-Type": "application/json"})
    assert not own_timeout_expired(504, answer.content, _body(_valid_request()), {})  # no deadline of its own
    assert not own_timeout_expired(500, answer.content, body, {})


def test_mutation_fuzzer_finds_nothing(gateway, tiny_repository):
    """benchmarks.fuzz (the robustness run's 50,000-request fuzzer), bounded: every kind of mutated
    request (JSON, binary, raw bodies, uploads, gRPC messages and undecodable gRPC bytes) is answered,
    none with a 5xx, UNKNOWN or INTERNAL, none dropped or hanging."""
    from benchmarks.fuzz import KINDS, fuzz
    from common.manifest import read_manifest

    shape = tuple(read_manifest(tiny_repository).input.shape)
    result = asyncio.run(fuzz(gateway.http_url, gateway.grpc_url, MODEL, shape, requests=600, concurrency=4,
                              seed=1))
    assert result["requests"] == 600 and result["bad"] == 0, result["findings"]
    assert {key.split(":")[0] for key in result["answers"]} == set(KINDS)
    assert any(key.endswith(":200") or key.endswith(":OK") for key in result["answers"])
