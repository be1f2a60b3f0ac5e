"""Keep freed memory in the process (glibc), so that large tensors freed and allocated again every step do not
page-fault each time.

glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB on 64-bit) with a fresh memory
map and returns it to the kernel on free; the next allocation of that size faults in and zero-fills every page
again. A training step on a CPU frees and re-allocates the same large activations every step, so it paid that
each time: an MQAR step of a 2-layer RWKV-5 (batch 64 x 128 tokens) spent 0.34 s of its 0.88 s in the kernel,
and an RWKV-7 chunked forward at 16 k tokens 0.55 s of kernel time against 0.7 s of arithmetic. With the
threshold raised and trimming off, freed blocks stay in the heap and are reused: kernel time ~0.

`keep_freed_memory()` sets that with mallopt (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD) for the whole
process: resident memory then stays at its peak instead of shrinking between steps, which is what a
long-running training or benchmark process wants and a short-lived command does not need. On other C
libraries (macOS, musl, Windows) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
_MAX_MMAP_THRESHOLD = 1 << 30  # any size up to this comes from the heap (glibc caps the setting at HEAP_MAX)
_done = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring). True if it took effect (or already
    had); idempotent."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, 2**31 - 1),
        (_M_TOP_PAD, 64 << 20)))
    _done = ok
    return ok
