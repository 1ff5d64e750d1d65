"""Backends run one cascade stage (a segment model) on a batch. Blocking calls:
the cascade runs them on worker threads (ONNX Runtime and gRPC release the GIL).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from common.manifest import FEATURES_OUTPUT, IMAGE_INPUT, LOGITS_OUTPUT, DeployedModel, Manifest
from common.onnxruntime_session import create_session, execution_providers
from serving.errors import Unavailable


class StageBackend(Protocol):
    name: str

    has_exit_models: bool  # whether run_exit works (every exit has a per-exit model)

    def run(self, stage: int, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment `stage` on a batch: (logits, activations for the next stage or None)."""

    def run_exit(self, index: int, images: np.ndarray) -> np.ndarray:
        """Exit `index`'s per-exit model (the whole prefix) on images: its logits."""

    def close(self) -> None: ...


def _output_names(model: DeployedModel) -> list[str]:
    return [LOGITS_OUTPUT] + ([FEATURES_OUTPUT] if len(model.outputs) > 1 else [])


class OnnxRuntimeBackend:
    """Embedded ONNX Runtime: one session per segment (and per exit model), made by
    the project's one session factory (non-spinning thread pools, see there)."""

    name = "onnxruntime"

    def __init__(self, repository: Path, manifest: Manifest, intra_op_threads: int = 1,
                 device: str = "auto") -> None:
        self.provider = execution_providers(device)[0]

        def session(model: DeployedModel):
            path = Path(repository) / model.name / str(model.version) / "model.onnx"
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: the onnxruntime backend needs the ONNX files")
            return create_session(path, intra_op_threads, device)

        self.sessions = [session(entry.segment_model) for entry in manifest.exits]
        self.outputs = [_output_names(entry.segment_model) for entry in manifest.exits]
        self.input_names = [entry.segment_model.inputs[0].name for entry in manifest.exits]
        self.has_exit_models = all(entry.exit_model is not None for entry in manifest.exits)
        self.exit_sessions = [session(entry.exit_model) for entry in manifest.exits] if self.has_exit_models else []

    def run(self, stage: int, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        results = self.sessions[stage].run(self.outputs[stage], {self.input_names[stage]: inputs})
        return results[0], (results[1] if len(results) > 1 else None)

    def run_exit(self, index: int, images: np.ndarray) -> np.ndarray:
        return self.exit_sessions[index].run([LOGITS_OUTPUT], {IMAGE_INPUT: images})[0]

    def close(self) -> None:
        self.sessions.clear()
        self.exit_sessions.clear()


def triton_request(module, protocol: str, name: str, inputs: np.ndarray, outputs, timeout_s: float):
    """tritonclient's (input tensor, requested outputs, keyword arguments of `infer`) for FP32
    `inputs` over `protocol` (`module`: tritonclient.http or .grpc, or their aio forms)."""
    tensor = module.InferInput(name, list(inputs.shape), "FP32")
    if protocol == "http":
        tensor.set_data_from_numpy(inputs, binary_data=True)
        requested = [module.InferRequestedOutput(output, binary_data=True) for output in outputs]
        return tensor, requested, {"timeout": int(timeout_s * 1e6)}
    tensor.set_data_from_numpy(inputs)
    return tensor, [module.InferRequestedOutput(output) for output in outputs], {"client_timeout": timeout_s}


class TritonBackend:
    """Segments served by a Triton server, called with tritonclient over HTTP or gRPC.

    Triton's own dynamic batcher batches each stage across calls.
    """

    name = "triton"

    def __init__(self, manifest: Manifest, url: str, protocol: str = "grpc", timeout_s: float = 30.0) -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
        self.manifest, self.url, self.protocol, self.timeout_s = manifest, url, protocol, timeout_s
        self._local = threading.local()  # tritonclient's HTTP client is not thread-safe
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self.module = module
        self.models = [entry.segment_model for entry in manifest.exits]
        self.has_exit_models = all(entry.exit_model is not None for entry in manifest.exits)
        self.exit_models = [entry.exit_model for entry in manifest.exits] if self.has_exit_models else []
        client = self._client()
        for model in self.models + self.exit_models:
            try:
                ready = client.is_model_ready(model.name, str(model.version))
            except Exception as error:  # tritonclient raises its own exception types
                raise Unavailable(f"Triton at {url} is not reachable: {error}") from None
            if not ready:
                raise Unavailable(f"Triton at {url} has no ready model {model.name} version {model.version}")

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self.module.InferenceServerClient(self.url)
            else:
                client = self.module.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                           network_timeout=self.timeout_s)
            self._local.client = client
        return client

    def run(self, stage: int, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        result = self._infer(self.models[stage], inputs)
        logits = result[0]
        return logits, (result[1] if len(result) > 1 else None)

    def run_exit(self, index: int, images: np.ndarray) -> np.ndarray:
        return self._infer(self.exit_models[index], images)[0]

    def _infer(self, model: DeployedModel, inputs: np.ndarray) -> list[np.ndarray]:
        names = _output_names(model)
        tensor, requested, kwargs = triton_request(self.module, self.protocol, model.inputs[0].name, inputs,
                                                   names, self.timeout_s)
        try:
            result = self._client().infer(model.name, [tensor], model_version=str(model.version),
                                          outputs=requested, **kwargs)
        except Exception as error:
            raise Unavailable(f"Triton call to {model.name} failed: {error}") from None
        return [result.as_numpy(name) for name in names]

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
