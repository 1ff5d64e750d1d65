"""Triton `config.pbtxt` text for exported models (protobuf text format)."""

from __future__ import annotations

from dataclasses import dataclass

from common.manifest import TensorSpec

PLATFORMS = {
    "onnxruntime": ('platform: "onnxruntime_onnx"', "model.onnx"),
    "tensorrt": ('platform: "tensorrt_plan"', "model.plan"),
    "python": ('backend: "python"', "model.py"),
}


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    max_queue_delay_us: int = 200
    instance_count: int = 1


def _tensor_block(kind: str, specs: list[TensorSpec]) -> str:
    entries = []
    for spec in specs:
        dims = ", ".join(str(d) for d in spec.shape)
        entries.append(f'  {{\n    name: "{spec.name}"\n    data_type: TYPE_{spec.dtype}\n    dims: [ {dims} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


def model_config(
    name: str,
    backend: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    batching: BatchingConfig,
) -> str:
    if backend not in PLATFORMS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(PLATFORMS)}")
    platform_line, _ = PLATFORMS[backend]
    preferred = [b for b in batching.preferred_batch_sizes if b <= batching.max_batch_size]
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_CPU"
    parts = [
        f'name: "{name}"',
        platform_line,
        f"max_batch_size: {batching.max_batch_size}",
        _tensor_block("input", inputs),
        _tensor_block("output", outputs),
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else "")
        + f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {batching.instance_count}\n    kind: {kind}\n  }}\n]",
    ]
    if backend == "python":
        # The stub runs model.py with this venv's onnxruntime; one thread per instance.
        parts.append('parameters: {\n  key: "intra_op_threads"\n  value: { string_value: "1" }\n}')
    return "\n".join(parts) + "\n"


def model_file_name(backend: str) -> str:
    return PLATFORMS[backend][1]
