"""The exported python-backend repository in a real tritonserver (nvidia-pytriton)."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from benchmarks.triton_launcher import TritonServer
from common.manifest import read_manifest
from common.onnxruntime_session import create_session


@pytest.fixture(scope="module")
def triton(tiny_repository, triton_venv, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(tiny_repository, triton_venv, log_path=log) as server:
        yield server


def _infer(client, module, model, inputs: dict[str, np.ndarray], outputs: list[str]):
    tensors = []
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    requested = [module.InferRequestedOutput(name) for name in outputs]
    result = client.infer(model.name, tensors, model_version=str(model.version), outputs=requested)
    return [result.as_numpy(name) for name in outputs]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_exit_and_segment_matches_onnx_runtime(triton, tiny_repository, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(triton.http_url if protocol == "http" else triton.grpc_url)
    manifest = read_manifest(tiny_repository)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((5, *manifest.input.shape)).astype(np.float32)
    features = images
    for entry in manifest.exits:
        for deployed in (entry.exit_model, entry.segment_model):
            assert client.is_model_ready(deployed.name, str(deployed.version))
        (exit_logits,) = _infer(client, module, entry.exit_model, {"images": images}, ["logits"])
        session = create_session(tiny_repository / entry.exit_model.name / str(entry.exit_model.version)
                                 / "model.onnx")
        np.testing.assert_allclose(exit_logits, session.run(None, {"images": images})[0], atol=1e-5)
        names = [spec.name for spec in entry.segment_model.outputs]
        outputs = _infer(client, module, entry.segment_model, {entry.segment_model.inputs[0].name: features}, names)
        np.testing.assert_allclose(outputs[0], exit_logits, atol=1e-4)
        if len(outputs) > 1:
            features = outputs[1]
