"""The gateway's Triton backend against a real tritonserver (nvidia-pytriton)."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from benchmarks.triton_launcher import TritonServer

from .conftest import GatewayProcess

MODEL = "mwresnet8_3"
POLICIES = [{"policy": "full"}, {"threshold": 0.0}, {"threshold": 0.6}, {"policy": "fixed", "exit_depth": 5}]


@pytest.fixture(scope="module")
def triton(tiny_repository, triton_venv, tmp_path_factory):
    with TritonServer(tiny_repository, triton_venv, log_path=tmp_path_factory.mktemp("t") / "triton.log") as server:
        yield server


def _ask(url, images, parameters):
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer(MODEL, [tensor], parameters=parameters)
    return result.as_numpy("logits"), result.as_numpy("exit_depth")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_backend_gives_the_same_answers_as_onnx_runtime(triton, tiny_repository, tmp_path, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    images = (np.random.default_rng(4).standard_normal((7, 3, 32, 32)) * 2).astype(np.float32)
    on_triton = GatewayProcess(tiny_repository, "--backend", "triton", "--triton-url", url,
                               "--triton-protocol", protocol, log_path=tmp_path / "gw-triton.log")
    on_ort = GatewayProcess(tiny_repository, log_path=tmp_path / "gw-ort.log")
    try:
        for parameters in POLICIES:
            logits_t, depths_t = _ask(on_triton.grpc_url, images, parameters)
            logits_o, depths_o = _ask(on_ort.grpc_url, images, parameters)
            assert depths_t.tolist() == depths_o.tolist()
            np.testing.assert_allclose(logits_t, logits_o, atol=1e-4)
        http = httpclient.InferenceServerClient(on_triton.http_url)
        assert http.is_model_ready(MODEL)
    finally:
        assert on_triton.stop() == 0 and on_ort.stop() == 0


def test_unreachable_triton_is_a_one_line_error(tiny_repository):
    from benchmarks.triton_launcher import free_port

    from .conftest import run_module

    result = run_module("serving", "--model-repository", str(tiny_repository), "--backend", "triton",
                        "--triton-url", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "not reachable" in result.stderr
    assert "Traceback" not in result.stderr
