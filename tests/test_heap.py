"""serving/heap.py: the gateway fixes glibc's mmap threshold so that large buffers never settle in the heap, and limits
its arenas so that the threads' small blocks do not fragment arenas of their own
(issue 25: memory after an overload)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from benchmarks.servers import GatewayServer
from serving import heap

pytestmark = pytest.mark.skipif(heap.LIBC is None or not hasattr(heap.LIBC, "mallinfo2"),
                                reason="glibc >= 2.33 (mallinfo2) only")

# In a fresh process: a 16 MiB block freed (glibc's moving threshold rises to its size), then eight 1 MiB
# blocks; prints how many MiB of them glibc gave pages of their own (mmap) rather than heap.
PROBE = textwrap.dedent("""
    import ctypes, sys
    from serving import heap

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    heap.LIBC.mallinfo2.restype = MallInfo2
    heap.LIBC.malloc.restype = ctypes.c_void_p
    heap.LIBC.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] != "0":
        assert heap.fix_mmap_threshold(int(sys.argv[1]))
    heap.LIBC.free(heap.LIBC.malloc(16 * 2**20))
    before = heap.LIBC.mallinfo2().hblkhd
    blocks = [heap.LIBC.malloc(2**20) for _ in range(8)]
    print((heap.LIBC.mallinfo2().hblkhd - before) // 2**20)
""")


def mmapped_mib(threshold: int) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_fixed_threshold_keeps_large_blocks_out_of_the_heap():
    assert mmapped_mib(0) == 0  # glibc's default: after one large block, 1 MiB ones come from the heap
    assert mmapped_mib(128 * 1024) == 8  # fixed: each gets its own pages, returned when freed


def test_zero_leaves_the_default():
    assert heap.fix_mmap_threshold(0) is False
    assert heap.trim() is True


def test_the_gateway_fixes_it_unless_told_not_to(tiny_repository, tmp_path):
    for extra, expected in (((), 128), (("--mmap-threshold-kb", "0"), None), (("--mmap-threshold-kb", "256"), 256)):
        with GatewayServer(tiny_repository, *extra, log_path=tmp_path / "gateway.log") as gateway:
            assert gateway.ready_fields()["mmap_threshold_kb"] == expected


# In a fresh process: a thread allocates small blocks (glibc gives a new thread an arena of its own, up to
# 8 per core); prints how many arenas malloc_info lists.
ARENAS_PROBE = textwrap.dedent("""
    import ctypes, re, sys, tempfile, threading
    from serving import heap

    if sys.argv[1] != "0":
        assert heap.limit_arenas(int(sys.argv[1]))
    heap.LIBC.malloc.restype = ctypes.c_void_p
    heap.LIBC.fopen.restype = ctypes.c_void_p
    heap.LIBC.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    heap.LIBC.fclose.argtypes = [ctypes.c_void_p]
    heap.LIBC.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    blocks = []
    thread = threading.Thread(target=lambda: blocks.extend(heap.LIBC.malloc(512) for _ in range(1000)))
    thread.start()
    thread.join()
    with tempfile.NamedTemporaryFile(suffix=".xml") as out:
        stream = heap.LIBC.fopen(out.name.encode(), b"w")
        heap.LIBC.malloc_info(0, stream)
        heap.LIBC.fclose(stream)
        print(len(re.findall(r"<heap nr=", open(out.name).read())))
""")


def arenas(limit: int) -> int:
    done = subprocess.run([sys.executable, "-c", ARENAS_PROBE, str(limit)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_limited_arenas_are_shared_by_the_threads():
    assert arenas(0) >= 2  # glibc's default: the thread allocated in an arena of its own
    assert arenas(1) == 1  # limited: the main arena serves it too
    assert heap.limit_arenas(0) is False


def test_the_gateway_limits_arenas_unless_told_not_to(tiny_repository, tmp_path):
    for extra, expected in (((), 1), (("--malloc-arenas", "0"), None), (("--malloc-arenas", "2"), 2)):
        with GatewayServer(tiny_repository, *extra, log_path=tmp_path / "gateway.log") as gateway:
            assert gateway.ready_fields()["malloc_arenas"] == expected


def test_the_gateway_sessions_share_one_cpu_arena_with_the_same_answers(tiny_repository):
    """ONNX Runtime: the gateway's sessions use the process's shared CPU arena (regions the size of what
    was asked, which the idle shrinkage frees), registered once, with the same outputs as a session's own."""
    from common.manifest import read_manifest
    from common.onnxruntime_session import create_session, share_cpu_arena
    from serving.backends import OnnxRuntimeBackend

    manifest = read_manifest(tiny_repository)
    backend = OnnxRuntimeBackend(tiny_repository, manifest, device="cpu")
    share_cpu_arena()  # again: registered once, no error
    options = backend.sessions[0].get_session_options()
    assert options.get_session_config_entry("session.use_env_allocators") == "1"
    segment = manifest.exits[0].segment_model
    own = create_session(tiny_repository / segment.name / str(segment.version) / "model.onnx")
    images = np.random.default_rng(0).standard_normal((5, *manifest.input.shape)).astype(np.float32)
    logits, features = backend.run(0, images)
    expected = own.run(None, {segment.inputs[0].name: images})
    np.testing.assert_array_equal(logits, expected[0])
    if features is not None:
        np.testing.assert_array_equal(features, expected[1])
    backend.release_memory()  # the idle shrinkage runs on the shared arena
