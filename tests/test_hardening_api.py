"""The front ends under hostile input (issue 25), validation: malformed KServe v2 requests over HTTP
(JSON and binary) and gRPC are 4xx / INVALID_ARGUMENT naming the field, internal errors are generic,
logged and counted, and /v1/classify refuses image bombs and oversized uploads from their headers;
real gateway processes on the tiny model. Clients and security options: test_hardening_api_security.py;
fuzzing: test_hardening_api_fuzz.py."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc

from benchmarks.triton_launcher import free_port

from .conftest import png_bytes
from .hardening_helpers import (
    BATCH_LIMIT,
    MODEL,
    hardened_gateway,
    input_spec,
    json_body,
    post,
    strict_json,
    valid_request,
)


@pytest.fixture(scope="module")
def gateway(tiny_repository, tmp_path_factory):
    yield from hardened_gateway(tiny_repository, tmp_path_factory)


NESTED = b"[" * 1000 + b"]" * 1000

# (body, headers, status, words the message must contain): the fuzzing findings of issue 25 and their kin.
MALFORMED = {
    "parameters not an object": (json_body(valid_request(parameters=[1, 2])), None, 400, "'parameters'"),
    "parameters a string": (json_body(valid_request(parameters="fast")), None, 400, "'parameters'"),
    "input parameters not an object": (json_body(valid_request(inputs=[input_spec(parameters=[])])), None, 400,
                                       "inputs[0].parameters"),
    "outputs a number": (json_body(valid_request(outputs=5)), None, 400, "'outputs'"),
    "output not an object": (json_body(valid_request(outputs=[5])), None, 400, "outputs[0]"),
    "output parameters not an object": (json_body(valid_request(outputs=[{"name": "logits", "parameters": 3}])),
                                        None, 400, "outputs[0].parameters"),
    "bool in shape": (json_body(valid_request(inputs=[input_spec(shape=[True, 3, 32, 32])])), None, 400, "shape"),
    "negative shape": (json_body(valid_request(inputs=[input_spec(shape=[-1, 3, 32, 32])])), None, 400, "shape"),
    "float shape": (json_body(valid_request(inputs=[input_spec(shape=[1.0, 3, 32, 32])])), None, 400, "shape"),
    "shape overflowing int64": (json_body(valid_request(inputs=[input_spec(shape=[4611686018427387904, 4])])), None,
                                400, "shape"),
    "shape of 2**64": (json_body(valid_request(inputs=[input_spec(shape=[2 ** 64, 3, 32, 32])])), None, 400, "shape"),
    "zero in an overflowing shape": (json_body(valid_request(inputs=[input_spec(shape=[0, 2 ** 63, 2 ** 63])])), None,
                                     400, "shape"),
    "datatype not a string": (json_body(valid_request(inputs=[input_spec(datatype=["FP32"])])), None, 400, "datatype"),
    "unknown datatype": (json_body(valid_request(inputs=[input_spec(datatype="FP128")])), None, 400, "datatype"),
    "name not a string": (json_body(valid_request(inputs=[input_spec(name=7)])), None, 400, "inputs[0]"),
    "id not a string": (json_body(valid_request(id=[1])), None, 400, "'id'"),
    "binary_data_size a bool": (json_body(valid_request(inputs=[input_spec(parameters={"binary_data_size": True})])),
                                None, 400, "binary_data_size"),
    "exit_depth Infinity": (b'{"inputs": [], "parameters": {"policy": "fixed", "exit_depth": Infinity}}', None,
                            400, "exit_depth"),
    "budget_ms NaN": (b'{"inputs": [], "parameters": {"budget_ms": NaN}}', None, 400, "budget_ms"),
    "exit_depth a list": (json_body(valid_request(parameters={"policy": "fixed", "exit_depth": [3]})), None, 422,
                          "exit_depth"),
    "classification a string": (json_body(valid_request(outputs=[{"name": "logits",
                                                                "parameters": {"classification": "2"}}])),
                                None, 422, "classification"),
    "JSON nested 1,000 deep in inputs": (b'{"inputs": ' + NESTED + b"}", None, 400, "inputs[0]"),
    "JSON nested 1,000 deep in id": (b'{"inputs": [], "id": ' + NESTED + b"}", None, 400, "'id'"),
    "JSON nested 1,000 deep in data": (json_body(valid_request(inputs=[input_spec(datatype="BYTES", shape=[1])]))
                                       .replace(b"[0.0" + b", 0.0" * 3071 + b"]", NESTED), None, 400, "data"),
    "JSON nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, None, 400, "JSON"),
    "non-ASCII digits in the header length": (json_body(valid_request()),
                                              {"Inference-Header-Content-Length": "\u0661\u0662"}, 400,
                                              "Inference-Header-Content-Length"),
    "superscript digit in the header length": (json_body(valid_request()),
                                               {"Inference-Header-Content-Length": "\u00b2"}, 400,
                                               "Inference-Header-Content-Length"),
    "negative header length": (json_body(valid_request()), {"Inference-Header-Content-Length": "-5"}, 400,
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
    assert post(gateway, json_body(valid_request(outputs=5))).status_code == 400
    metrics = gateway.metrics()
    assert 'gateway_errors_total{error="InvalidInput",protocol="http"}' in metrics


def test_non_finite_outputs_are_valid_json(gateway):
    """Huge finite inputs overflow the network to inf/NaN logits: the JSON answer writes them as null
    (KServe's convention, which numpy reads back as NaN), the binary answer keeps them exactly."""
    images = np.full((2, 3, 32, 32), 3e38, np.float32)
    images[1] = 0.0
    request = valid_request(inputs=[input_spec(shape=[2, 3, 32, 32], data=images.reshape(-1).tolist())],
                             parameters={"policy": "full"})
    response = post(gateway, json_body(request))
    assert response.status_code == 200, response.text
    document = strict_json(response.content)
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
        response = client.post(f"/v2/models/{MODEL}/infer", content=json_body(valid_request()),
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

