"""Transport-agnostic protocol logic: the HTTP and gRPC front ends translate to and
from these calls and nothing else.

The gateway serves one model, named as in the manifest (for example
`mwresnet56_5`). Its input `images` is either the normalised float32 NCHW tensor
the manifest describes or raw uint8 NHWC images that the gateway normalises.
Outputs: `logits` or `probabilities` of the exit each sample left at, `exit_depth`
and `confidence` per sample; `classification` (top-k labels) on either of the first two.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from common.manifest import Manifest
from serving import policy
from serving.cascade import Cascade
from serving.errors import (
    DeadlineExceeded,
    InvalidInput,
    InvalidParameter,
    ModelNotFound,
    PayloadTooLarge,
    invalid_parameter_on_policy_error,
)
from serving.metrics import GatewayMetrics
from serving.policy import POLICY_PARAMETERS, RequestOptions, softmax
from serving.preprocess import match_channels, normalise_uint8
from serving.tensors import Tensor

SERVER_NAME = "early-exit-gateway"
SERVER_VERSION = "0.1.0"
INPUT_NAME = "images"
OUTPUTS = {"logits": "FP32", "probabilities": "FP32", "exit_depth": "INT32", "confidence": "FP32"}
DEFAULT_OUTPUTS = ("logits", "exit_depth", "confidence")
OPTIONS_CACHE_SIZE = 1024  # distinct sets of policy parameters remembered


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int = 0  # top-k labels instead of values when > 0
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    model_name: str
    inputs: list[Tensor]
    model_version: str = ""
    id: str = ""
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    requested: list[RequestedOutput]


# The policy module is shared with the Triton cascade model, so it raises its own
# PolicyError; the gateway's entry points to it answer InvalidParameter instead.
options_from_parameters = invalid_parameter_on_policy_error(policy.options_from_parameters)
resolve_options = invalid_parameter_on_policy_error(policy.resolve_options)


class DataPlane:
    def __init__(self, manifest: Manifest, cascade: Cascade, metrics: GatewayMetrics,
                 default_policy: str = "confidence", max_request_batch: int = 256,
                 request_timeout_s: float = 0.0) -> None:
        self.manifest, self.cascade, self.metrics = manifest, cascade, metrics
        self.model_metrics = metrics.model(manifest.model)  # its series (`model` label), made once
        self.default_policy = default_policy
        self.request_timeout_s = request_timeout_s  # deadline of requests that bring none (0: none)
        self.max_request_batch = max_request_batch
        self.plan = cascade.plan
        self._depths = np.asarray(self.plan.depths, np.int32)
        self._default_outputs = [RequestedOutput(name) for name in DEFAULT_OUTPUTS]
        # Resolved options by the request's policy parameters (name, type, value), so the
        # common requests (none, or the same few again and again) build nothing.
        self._options: dict[tuple, RequestOptions] = {}

    def request_options(self, parameters: dict) -> RequestOptions:
        """Resolved policy options of a request's `parameters` (memoised; errors are not)."""
        chosen = {name: value for name, value in parameters.items() if name in POLICY_PARAMETERS}
        key = tuple((name, type(value), value) for name, value in chosen.items())
        try:
            return self._options[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable value (a JSON list of thresholds): resolved every time
            return resolve_options(options_from_parameters(chosen, self.default_policy), self.plan)
        options = resolve_options(options_from_parameters(chosen, self.default_policy), self.plan)
        if len(self._options) >= OPTIONS_CACHE_SIZE:
            self._options.clear()
        self._options[key] = options
        return options

    def deadline(self, parameters: dict | None = None, timeout_s: float | str | None = None) -> float | None:
        """The request's deadline as a time.monotonic(): the earliest of its client's (`timeout_s`:
        the gRPC deadline's time remaining, or the HTTP `timeout` header, in seconds), its `timeout`
        parameter (microseconds, as tritonclient sends it) and the server's default timeout."""
        now = time.monotonic()
        limits = [self.request_timeout_s] if self.request_timeout_s > 0 else []
        if isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        if timeout_s is not None:
            limits.append(_positive_seconds("timeout", timeout_s, 1.0))
        if parameters and parameters.get("timeout") is not None:
            limits.append(_positive_seconds("timeout", parameters["timeout"], 1e-6))
        return now + min(limits) if limits else None

    # -- health and metadata ------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Accepting requests (not shutting down) with a backend that answers its health check."""
        return self.cascade.ready

    def check_model(self, name: str, version: str = "") -> None:
        if name != self.manifest.model:
            raise ModelNotFound(f"unknown model {name!r}; this gateway serves {self.manifest.model!r}")
        if version not in ("", "1"):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; available: 1")

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data",
                                                                               "classification"]}

    def model_metadata(self, name: str, version: str = "") -> dict:
        self.check_model(name, version)
        classes = len(self.manifest.classes)
        return {
            "name": self.manifest.model, "versions": ["1"], "platform": "early_exit_cascade",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *self.manifest.input.shape]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
                        {"name": "exit_depth", "datatype": "INT32", "shape": [-1]},
                        {"name": "confidence", "datatype": "FP32", "shape": [-1]}],
            "parameters": {"exit_depths": ",".join(map(str, self.plan.depths)),
                           "classes": ",".join(self.manifest.classes)},
        }

    # -- inference ----------------------------------------------------------
    def normalise(self, name: str, tensor: Tensor) -> np.ndarray:
        """Float32 NCHW normalised images from either accepted input form."""
        channels, height, width = self.manifest.input.shape
        data = tensor.data
        if tensor.datatype == "FP32" and tensor.shape[1:] == (channels, height, width):
            array = np.ascontiguousarray(data, dtype=np.float32)
            # One reduction: a NaN or an infinity makes the sum non-finite; only then (or when finite values
            # overflow it) is every value looked at.
            if not math.isfinite(array.sum()) and not np.isfinite(array).all():
                raise InvalidParameter(f"input {name!r} contains NaN or Inf values")
            return array
        if tensor.datatype == "UINT8" and tensor.shape[1:] == (height, width, channels):
            return normalise_uint8(data, self.manifest.mean, self.manifest.std)
        raise InvalidInput(
            f"input {name!r} must be FP32 [N, {channels}, {height}, {width}] (normalised) or UINT8 "
            f"[N, {height}, {width}, {channels}] (raw images); got {tensor.datatype} {list(tensor.shape)}")

    def _images(self, request: InferRequest) -> np.ndarray:
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
            names = [t.name for t in request.inputs]
            raise InvalidInput(f"expected exactly one input named {INPUT_NAME!r}, got {names}")
        tensor = request.inputs[0]
        if len(tensor.shape) != 4 or tensor.shape[0] < 1:
            raise InvalidInput(f"input {INPUT_NAME!r} must be a batch of at least one image with 4 dimensions, "
                               f"got shape {list(tensor.shape)}")
        if tensor.shape[0] > self.max_request_batch:
            raise PayloadTooLarge(f"{tensor.shape[0]} images in one request; the limit is {self.max_request_batch}")
        return self.normalise(INPUT_NAME, tensor)

    def _check_outputs(self, requested: list[RequestedOutput]) -> list[RequestedOutput]:
        if not requested:
            return self._default_outputs
        for output in requested:
            if output.name not in OUTPUTS:
                raise InvalidInput(f"unknown output {output.name!r}; available: {', '.join(OUTPUTS)}")
            if output.classification < 0:
                raise InvalidParameter("classification must be a positive number of classes")
            if output.classification and output.name not in ("logits", "probabilities"):
                raise InvalidParameter(f"classification applies to logits or probabilities, not {output.name}")
        return requested

    async def infer(self, request: InferRequest, protocol: str = "http",
                    timeout_s: float | str | None = None) -> InferResponse:
        """`timeout_s`: the client's own deadline, in seconds from now (gRPC's time remaining,
        or an HTTP `timeout` header), if it gave one."""
        started = time.perf_counter()
        deadline = self.deadline(request.parameters, timeout_s)
        self.check_model(request.model_name, request.model_version)
        images = self._images(request)
        outputs = self._check_outputs(request.outputs)
        result = await self.cascade.infer(images, self.request_options(request.parameters), deadline)
        tensors = [self._output_tensor(output, result) for output in outputs]
        self.model_metrics.answered(protocol, len(images), time.perf_counter() - started)
        return InferResponse(self.manifest.model, "1", request.id, tensors, outputs)

    def _output_tensor(self, output: RequestedOutput, result) -> Tensor:
        count = len(result.exit_index)
        if output.name in ("logits", "probabilities"):
            values = result.logits if output.name == "logits" else softmax(result.logits).astype(np.float32)
            if output.classification:
                return self._classification(output, values)
            return Tensor(output.name, "FP32", values.shape, values)
        if output.name == "exit_depth":
            depths = self._depths[result.exit_index]
            return Tensor("exit_depth", "INT32", (count,), depths)
        return Tensor("confidence", "FP32", (count,), result.confidence.astype(np.float32, copy=False))

    def _classification(self, output: RequestedOutput, values: np.ndarray) -> Tensor:
        """Triton's classification extension: "value:index:label" strings, best first."""
        k = min(output.classification, values.shape[1])
        order = np.argsort(-values, axis=1)[:, :k]
        labels = [[f"{values[i, j]:f}:{j}:{self.manifest.classes[j]}".encode() for j in row]
                  for i, row in enumerate(order)]
        return Tensor(output.name, "BYTES", (len(values), k), np.array(labels, dtype=object))

    async def classify(self, images: np.ndarray, options: RequestOptions, top_k: int = 3) -> list[dict]:
        """Friendly endpoint: uint8 NHWC images -> label, confidence, exit depth, top-k. Decoded uploads
        of another channel count than the model's (RGB for a grayscale model) are converted first."""
        images = match_channels(images, self.manifest.input.shape[0])
        tensor = Tensor(INPUT_NAME, "UINT8", images.shape, images)
        normalised = self.normalise(INPUT_NAME, tensor)
        result = await self.cascade.infer(normalised, resolve_options(options, self.plan), self.deadline())
        probabilities = softmax(result.logits)
        self.model_metrics.samples.inc(len(images))
        answers = []
        for i in range(len(images)):
            order = np.argsort(-probabilities[i])[: max(1, min(top_k, len(self.manifest.classes)))]
            answers.append({
                "label": self.manifest.classes[order[0]], "class_index": int(order[0]),
                "probability": float(probabilities[i, order[0]]),
                "confidence": float(result.confidence[i]),
                "exit_depth": int(self.plan.depths[result.exit_index[i]]),
                "top_k": [{"label": self.manifest.classes[j], "probability": float(probabilities[i, j])}
                          for j in order],
            })
        return answers


def _positive_seconds(name: str, value, unit: float) -> float:
    """A timeout `value` (a number or a numeric string, in `unit` seconds) in seconds."""
    if isinstance(value, bool):
        raise InvalidParameter(f"{name} must be a positive number, got {value!r}")
    try:
        seconds = float(value) * unit
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidParameter(f"{name} must be a positive number, got {value!r}")
    return seconds
