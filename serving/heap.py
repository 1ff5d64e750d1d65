"""The gateway's heap and the system (glibc on Linux; elsewhere every call here does nothing).

- `trim()`: free heap pages back to the system (the cascade calls it when idle after load).
- `fix_mmap_threshold(size)`: allocations of `size` bytes and more get pages of their own (mmap), and
  freed memory at the top of every arena goes back to the system as it is freed. glibc's defaults move:
  each large block freed raises the mmap threshold to its size (up to 32 MB) and the trim threshold to
  twice that, and `malloc_trim` shrinks only the main arena's top, so what a burst of large batches
  freed at the top of the backend threads' own arenas stayed resident (issue 25: the gateway's memory
  1.05-1.23x its baseline after an overload, all of it heap). Fixing the threshold fixes both (glibc's
  starting values, 128 KiB). The price: large buffers are faulted in afresh (about 20-30 minor page
  faults a request, a few per cent of its CPU at most; benchmarks/results/2026-12-03-vm-robustness-proxy).
- `limit_arenas(count)`: at most `count` malloc arenas. glibc gives threads arenas of their own (up to 8
  per core), which the backend, front-end and gRPC threads' small blocks can leave fragmented (issue 25:
  the memory 10 s after an overload 1.03-1.10x its baseline with one arena against 1.10-1.18x without, at
  the same CPU per request; most of what stayed was ONNX Runtime's arena, which common/onnxruntime_session.py
  deals with; benchmarks/results/2026-12-04-vm-robustness-2/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_MMAP_THRESHOLD = -3  # mallopt's parameters (glibc malloc.h)
M_ARENA_MAX = -8
DEFAULT_MMAP_THRESHOLD = 128 * 1024
log = logging.getLogger("gateway.heap")


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


LIBC = _libc()


def trim() -> bool:
    """The heap's free pages back to the system; False where there is no glibc."""
    if LIBC is None:
        return False
    LIBC.malloc_trim(0)
    return True


def _mallopt(parameter: int, value: int, what: str) -> bool:
    """Set one of glibc's malloc parameters; 0 (or no glibc) leaves its default. True when set."""
    if not value or LIBC is None:
        return False
    if LIBC.mallopt(parameter, ctypes.c_int(value)) != 1:
        log.warning("glibc refused %s of %d; its default stays", what, value)
        return False
    return True


def fix_mmap_threshold(size: int) -> bool:
    """Fix glibc's mmap threshold at `size` bytes (see the module's doc); 0 leaves glibc's moving default.
    True when set."""
    return _mallopt(M_MMAP_THRESHOLD, size, "an mmap threshold in bytes")


def limit_arenas(count: int) -> bool:
    """At most `count` malloc arenas (see the module's doc; before threads allocate); 0 leaves glibc's
    default. True when set."""
    return _mallopt(M_ARENA_MAX, count, "an arena limit")
