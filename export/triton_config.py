"""Triton `config.pbtxt` for exported models: a `ModelConfig` message in protobuf text format."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from common.manifest import TensorSpec
from common.triton_cascade import IMAGES_INPUT, LABELS_FILE, NORMALISED_INPUT
from common.triton_cascade import OUTPUTS as CASCADE_OUTPUTS

# backend -> (ModelConfig field, its value, the model file in a version directory)
PLATFORMS = {
    "onnxruntime": ("platform", "onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("platform", "tensorrt_plan", "model.plan"),
    "python": ("backend", "python", "model.py"),
}


KEPT_VERSIONS = 2  # version_policy { latest { num_versions } } of every model


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    max_queue_delay_us: int = 200
    instance_count: int = 1


def _tensor(message, spec: TensorSpec) -> None:
    message.name = spec.name
    message.data_type = model_config_pb2.DataType.Value(f"TYPE_{spec.dtype}")
    message.dims.extend(spec.shape)


def build_model_config(
    name: str,
    backend: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    batching: BatchingConfig,
) -> model_config_pb2.ModelConfig:
    if backend not in PLATFORMS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(PLATFORMS)}")
    field, value, _ = PLATFORMS[backend]
    config = model_config_pb2.ModelConfig(name=name, max_batch_size=batching.max_batch_size)
    setattr(config, field, value)
    # The two newest versions: when export adds version N+1, Triton loads it beside N, which keeps serving
    # the requests already sent to it (the gateway calls each version by number) until the gateway swaps.
    config.version_policy.latest.num_versions = KEPT_VERSIONS
    for spec in inputs:
        _tensor(config.input.add(), spec)
    for spec in outputs:
        _tensor(config.output.add(), spec)
    config.dynamic_batching.preferred_batch_size.extend(
        b for b in batching.preferred_batch_sizes if b <= batching.max_batch_size)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    kind = model_config_pb2.ModelInstanceGroup.KIND_GPU if backend == "tensorrt" \
        else model_config_pb2.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=batching.instance_count, kind=kind)
    if backend == "python":
        # The stub runs model.py with this venv's onnxruntime; one thread per instance.
        config.parameters["intra_op_threads"].string_value = "1"
    return config


def model_config(
    name: str,
    backend: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    batching: BatchingConfig,
) -> str:
    """The `config.pbtxt` text of one model."""
    return text_format.MessageToString(build_model_config(name, backend, inputs, outputs, batching))


def model_file_name(backend: str) -> str:
    return PLATFORMS[backend][2]


def cascade_model_config(name: str, input_shape: list[int], classes: int, batching: BatchingConfig,
                         parameters: dict[str, str]) -> str:
    """`config.pbtxt` of the `<model>_cascade` Python-backend model (common/triton_cascade.py).

    Tensors as the gateway's: `images` UINT8 [H, W, C] or `normalised_images` FP32
    [C, H, W] (each optional; a request gives one), `logits` and `probabilities`
    [classes] (with the class labels, for Triton's classification extension),
    `exit_depth` and `confidence` one value per sample (shape [N], as the gateway's; `reshape`
    would make Triton answer [N, 1]).
    """
    channels, height, width = input_shape
    inputs = [TensorSpec(IMAGES_INPUT, [height, width, channels], "UINT8"),
              TensorSpec(NORMALISED_INPUT, [channels, height, width], "FP32")]
    outputs = [TensorSpec(output, [classes] if output in ("logits", "probabilities") else [1], dtype)
               for output, dtype in CASCADE_OUTPUTS.items()]
    config = build_model_config(name, "python", inputs, outputs, batching)
    del config.parameters["intra_op_threads"]
    config.ClearField("version_policy")  # one version: each is a Python stub process with its own sessions
    for tensor in config.input:
        tensor.optional = True
    for tensor in config.output:  # exit_depth and confidence: dims [1], yet the model answers
        if tensor.dims != [1]:       # shape [N] like the gateway (the Python backend passes it on)
            tensor.label_filename = LABELS_FILE
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return text_format.MessageToString(config)
