"""ONNX Runtime sessions, made one way everywhere: the gateway's embedded backend,
export validation, the latency profiler and Triton Python-backend models.

The repository writer copies this file verbatim beside each `model.py` (Triton's
Python backend cannot import the project), so it imports nothing from the project
and only the standard library at module level: onnxruntime is imported when a
session is made, which keeps `common` importable where onnxruntime is not installed.

Settings, measured on 2 cores with a five-segment cascade: idle intra-op pools
that spin starve each other when several sessions share few cores (0.47x the
full model's throughput with spinning, 1.14x without), so spinning is off, the
intra-op pool has an explicit size and the (sequential) inter-op pool one thread.
"""

from __future__ import annotations

import os

DEVICES = ("auto", "cpu", "cuda")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def execution_providers(device: str = "cpu") -> list[str]:
    """Providers for `device`: cpu, cuda (CPU for what CUDA lacks) or auto (cuda where available)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    use_cuda = device == "cuda"
    if device == "auto":
        import onnxruntime

        use_cuda = CUDA in onnxruntime.get_available_providers()
    return [CUDA, CPU] if use_cuda else [CPU]


def session_options(intra_op_threads: int = 1, parallel_branches: int = 1):
    """`onnxruntime.SessionOptions` with `intra_op_threads` non-spinning threads; a graph of
    `parallel_branches` > 1 independent branches (an ensemble's members) runs them at once."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    if parallel_branches > 1:
        options.execution_mode = onnxruntime.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = parallel_branches
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def create_session(model: bytes | str | os.PathLike, intra_op_threads: int = 1, device: str = "cpu",
                   parallel_branches: int = 1):
    """An `onnxruntime.InferenceSession` of `model` (ONNX bytes or a file path)."""
    import onnxruntime

    source = model if isinstance(model, bytes) else os.fspath(model)
    return onnxruntime.InferenceSession(source, session_options(intra_op_threads, parallel_branches),
                                        providers=execution_providers(device))
