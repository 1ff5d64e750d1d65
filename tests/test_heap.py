"""serving/heap.py: the gateway fixes glibc's mmap threshold so that large buffers never settle in the heap
(issue 25: memory after an overload)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
