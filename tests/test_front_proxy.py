"""deploy/nginx (benchmarks.front_proxy): the template renders, a real nginx in front of a real gateway
answers as the gateway does, and calls beyond the limit on calls in flight are refused by nginx with the
gateway's own statuses (gRPC RESOURCE_EXHAUSTED, HTTP 429 with Retry-After), health never refused.
The tests that run nginx skip where it is not installed (`make test` installs it where apt-get can)."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import urllib.error
import urllib.request
from concurrent import futures

import httpx
import numpy as np
import pytest

from benchmarks.front_proxy import PLACEHOLDER, TEMPLATE, FrontProxy, nginx_binary, render
from common.errors import UserError

from .conftest import GatewayProcess, png_bytes


def _has_nginx() -> bool:
    try:
        nginx_binary()
    except UserError:
        return False
    return True


needs_nginx = pytest.mark.skipif(not _has_nginx(), reason="nginx is not installed (apt-get install nginx-light)")
VALUES = {"EE_GATEWAY_GRPC": "10.0.0.1:8081", "EE_GATEWAY_HTTP": "10.0.0.1:8080", "EE_PROXY_GRPC_PORT": "9001",
          "EE_PROXY_HTTP_PORT": "9000", "EE_PROXY_MAX_IN_FLIGHT": 7}


def test_the_template_renders_its_placeholders_and_leaves_nginx_variables():
    rendered = render(TEMPLATE.read_text(), VALUES)
    assert not PLACEHOLDER.search(rendered)
    assert "server 10.0.0.1:8081;" in rendered and "server 10.0.0.1:8080;" in rendered
    assert "listen 9001 http2;" in rendered and "listen 9000;" in rendered
    assert rendered.count("limit_conn ee_in_flight 7;") == 2  # both front ends
    assert "$server_port" in rendered and "$proxy_add_x_forwarded_for" in rendered  # nginx's own, untouched
    with pytest.raises(UserError, match="EE_PROXY_MAX_IN_FLIGHT"):
        render(TEMPLATE.read_text(), {k: v for k, v in VALUES.items() if k != "EE_PROXY_MAX_IN_FLIGHT"})


def test_a_limit_below_one_is_refused_before_nginx_starts():
    with pytest.raises(UserError, match="at least 1"):
        FrontProxy("127.0.0.1:1", "127.0.0.1:2", max_in_flight=0)


def test_without_nginx_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(UserError, match="apt-get install nginx-light"):
        nginx_binary()


@needs_nginx
def test_the_gateway_behind_nginx_answers_as_it_does_directly(tiny_repository, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from common.manifest import read_manifest

    manifest = read_manifest(tiny_repository)
    images = np.random.default_rng(3).standard_normal((4, *manifest.input.shape)).astype(np.float32)
    with GatewayProcess(tiny_repository, log_path=tmp_path / "gateway.log") as gateway, \
            FrontProxy(gateway.grpc_url, gateway.http_url, max_in_flight=8) as proxy:
        answers = {}
        for route, module, url in (("grpc direct", grpcclient, gateway.grpc_url), ("grpc proxied", grpcclient,
                                   proxy.grpc_url), ("http direct", httpclient, gateway.http_url),
                                   ("http proxied", httpclient, proxy.http_url)):
            client = module.InferenceServerClient(url)
            tensor = module.InferInput(manifest.input.name, list(images.shape), "FP32")
            tensor.set_data_from_numpy(images)
            result = client.infer(manifest.model, [tensor])
            answers[route] = (result.as_numpy("logits"), result.as_numpy("exit_depth"))
            assert client.is_server_ready()
        for protocol in ("grpc", "http"):
            direct, proxied = answers[f"{protocol} direct"], answers[f"{protocol} proxied"]
            np.testing.assert_array_equal(direct[0], proxied[0])
            np.testing.assert_array_equal(direct[1], proxied[1])
        with urllib.request.urlopen(f"http://{proxy.http_url}/metrics", timeout=10) as reply:
            assert b"gateway_requests_total" in reply.read()
        # an upload (multipart, streamed through nginx) and the gateway's own 4xx, unchanged
        image = np.random.default_rng(4).integers(0, 255, size=(40, 30, 3), dtype=np.uint8)
        files = [("files", ("a.png", png_bytes(image), "image/png"))]
        classified = {url: httpx.post(f"http://{url}/v1/classify", files=files, timeout=30)
                      for url in (gateway.http_url, proxy.http_url)}
        assert classified[proxy.http_url].status_code == 200, classified[proxy.http_url].text
        assert classified[proxy.http_url].json()["results"] == classified[gateway.http_url].json()["results"]
        wrong = httpx.post(f"http://{proxy.http_url}/v1/classify", files=[("files", ("a.txt", b"hi", "text/plain"))])
        assert wrong.status_code == 422 and "a.txt" in wrong.json()["error"]
    log = [json.loads(line) for line in (tmp_path / "gateway.log").read_text().splitlines() if line.startswith("{")]
    ready = next(entry for entry in log if entry.get("message") == "gateway ready")
    assert ready["admission_images"] > 0  # what the proxy's limit is set from


class _Held:
    """Real upstream servers that hold every inference call until released: a grpc server (KServe's
    ModelInfer, raw bytes) and an HTTP server (POST held; GET /v2/health/ready answered at once)."""

    def __init__(self) -> None:
        import grpc

        self.arrived, self.release = threading.Semaphore(0), threading.Event()
        self.time_remaining: list[float | None] = []  # each gRPC call's deadline as the upstream saw it
        held = self

        self.cancelled = threading.Semaphore(0)  # calls whose client went away while held

        def model_infer(request: bytes, context) -> bytes:
            held.time_remaining.append(context.time_remaining())
            held.arrived.release()
            while not held.release.wait(0.02):
                if not context.is_active():
                    held.cancelled.release()
                    break
            return b""  # an empty ModelInferResponse

        self.grpc = grpc.server(futures.ThreadPoolExecutor(8))
        self.grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)})])
        self.grpc_url = f"127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"
        self.grpc.start()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # health
                self._answer(b"{}")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                held.arrived.release()
                held.release.wait(30)
                self._answer(b'{"outputs": []}')

            def log_message(self, *args) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_url = f"127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.grpc.stop(0)
        self.http.shutdown()


@needs_nginx
def test_calls_beyond_the_limit_are_refused_by_nginx_with_the_gateways_statuses():
    import grpc

    held = _Held()
    try:
        with FrontProxy(held.grpc_url, held.http_url, max_in_flight=1) as proxy:
            channel = grpc.insecure_channel(proxy.grpc_url)
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            first = infer.future(b"", timeout=30)
            assert held.arrived.acquire(timeout=10)  # the first call holds the one slot
            assert 0 < held.time_remaining[0] <= 30  # the client's deadline reaches the gateway (grpc-timeout)
            with pytest.raises(grpc.RpcError) as refused:
                infer(b"", timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at capacity" in refused.value.details()

            url = f"http://{proxy.http_url}/v2/models/m/infer"
            posted = threading.Thread(target=lambda: urllib.request.urlopen(
                urllib.request.Request(url, data=b"{}", method="POST"), timeout=30).read(), daemon=True)
            posted.start()
            assert held.arrived.acquire(timeout=10)
            with pytest.raises(urllib.error.HTTPError) as http_refused:
                urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=10)
            assert http_refused.value.code == 429
            assert http_refused.value.headers["Retry-After"] == "1"
            assert "at capacity" in json.loads(http_refused.value.read())["error"]
            with urllib.request.urlopen(f"http://{proxy.http_url}/v2/health/ready", timeout=10) as health:
                assert health.status == 200  # never refused, even at the limit

            held.release.set()
            first.result(timeout=10)
            posted.join(10)
            assert infer(b"", timeout=10) == b""  # the slot is free again
            channel.close()
    finally:
        held.close()


def test_the_compose_service_sets_every_placeholder_of_the_template():
    """docker-compose.yml's front-proxy gives the official image's template rendering a value for each
    placeholder, and mounts the template where that image reads templates."""
    import yaml

    from common.paths import REPO_ROOT

    service = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["front-proxy"]
    assert set(PLACEHOLDER.findall(TEMPLATE.read_text())) == set(service["environment"])
    assert "./deploy/nginx/templates:/etc/nginx/templates:ro" in service["volumes"]
    rendered = render(TEMPLATE.read_text(), service["environment"])
    assert "server gateway:8081;" in rendered and "listen 9081 http2;" in rendered


@needs_nginx
def test_an_unreachable_gateway_is_unavailable_in_each_protocols_own_form():
    """nginx's own errors keep the gateway's forms: gRPC UNAVAILABLE with a message, HTTP 503 JSON."""
    import grpc

    from benchmarks.triton_launcher import free_ports

    grpc_port, http_port = free_ports(2)  # nothing listens there
    with FrontProxy(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", max_in_flight=4) as proxy:
        with grpc.insecure_channel(proxy.grpc_url) as channel:
            with pytest.raises(grpc.RpcError) as failed:
                channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert failed.value.details() == "the gateway is not reachable"
        for path, data in (("/v2/models/m/infer", b"{}"), ("/v2/health/ready", None)):
            with pytest.raises(urllib.error.HTTPError) as http_failed:
                urllib.request.urlopen(urllib.request.Request(f"http://{proxy.http_url}{path}", data=data), timeout=10)
            assert http_failed.value.code == 503
            assert json.loads(http_failed.value.read()) == {"error": "the gateway is not reachable"}


@needs_nginx
def test_a_call_its_client_cancels_is_cancelled_at_the_gateway_too():
    """A client that leaves (cancels its call) through nginx: the gateway's side of the call ends too, so
    the gateway drops its samples (issue 25: no work for clients that left)."""
    import grpc

    held = _Held()
    try:
        with FrontProxy(held.grpc_url, held.http_url, max_in_flight=4) as proxy:
            with grpc.insecure_channel(proxy.grpc_url) as channel:
                call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer").future(b"", timeout=60)
                assert held.arrived.acquire(timeout=10)
                call.cancel()
                assert held.cancelled.acquire(timeout=10), "the upstream call outlived its cancelled client"
    finally:
        held.close()
