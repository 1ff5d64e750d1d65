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

`shared_arena=True` (the gateway's sessions): one CPU memory arena for all of them, grown by what each
allocation asks for rather than by powers of two, so that what a burst of large batches added is freed
when the arena shrinks (issue 25: a 16 MB region of a session's own arena stayed after an overload;
benchmarks/results/2026-12-04-vm-robustness-2/README.md).
"""

from __future__ import annotations

import os
import threading

_shared_arena_lock = threading.Lock()
_shared_arena_registered = False  # once per process

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


def share_cpu_arena() -> None:
    """Register the process's shared CPU arena (see the module's doc) once."""
    global _shared_arena_registered
    import onnxruntime

    with _shared_arena_lock:
        if not _shared_arena_registered:
            info = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                             onnxruntime.OrtMemType.DEFAULT)
            # arena_extend_strategy 1: kSameAsRequested (0, the default, doubles each new region)
            onnxruntime.create_and_register_allocator(info, onnxruntime.OrtArenaCfg({"arena_extend_strategy": 1}))
            _shared_arena_registered = True


def session_options(intra_op_threads: int = 1, parallel_branches: int = 1, shared_arena: bool = False):
    """`onnxruntime.SessionOptions` with `intra_op_threads` non-spinning threads; a graph of
    `parallel_branches` > 1 independent branches (an ensemble's members) runs them at once;
    `shared_arena`: the process's shared CPU arena (see the module's doc)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    if parallel_branches > 1:
        options.execution_mode = onnxruntime.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = parallel_branches
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if shared_arena:
        share_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def create_session(model: bytes | str | os.PathLike, intra_op_threads: int = 1, device: str = "cpu",
                   parallel_branches: int = 1, shared_arena: bool = False):
    """An `onnxruntime.InferenceSession` of `model` (ONNX bytes or a file path)."""
    import onnxruntime

    source = model if isinstance(model, bytes) else os.fspath(model)
    return onnxruntime.InferenceSession(source, session_options(intra_op_threads, parallel_branches, shared_arena),
                                        providers=execution_providers(device))
