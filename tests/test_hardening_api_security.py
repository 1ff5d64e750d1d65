"""The front ends under hostile input (issue 25), clients and security options: JSON health bodies
(tritonclient and KServe's own clients), the OpenAPI document, the API key, docs switched off, slow
clients, connection limits (HTTP and gRPC) and TLS; real gateway processes on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from benchmarks.triton_launcher import free_ports
from common.paths import REPO_ROOT

from .conftest import GatewayProcess
from .hardening_helpers import MODEL, hardened_gateway, json_body, valid_request

API_KEY = "s3cret-key"
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def gateway(tiny_repository, tmp_path_factory):
    yield from hardened_gateway(tiny_repository, tmp_path_factory)


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
    body = json_body(valid_request())
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
    http_port, grpc_port = free_ports(2)
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
