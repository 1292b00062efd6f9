"""glibc's allocator, set for a server whose responses are hundreds of kilobytes each.

By default glibc gives an allocation of more than 128 KB (a threshold it raises as such blocks are
freed) its own mapping, and returns freed memory to the kernel soon after; the next response of that
size may then fault its pages in again. A 256-image Sample response is 800 KB, copied several times on
its way out (concatenating the batches, bytes, protobuf, gRPC). At times on the benchmark machine this
cost the service 2.6-2.9 ms of CPU a request with the graphs replaced by canned outputs, against 0.8
with the thresholds below, and Sample 256/request was 11% faster with them; at other times both
measured the same (docs/BENCHMARKS.md). The price: up to 32 MB more resident after large requests.
"""

from __future__ import annotations

import ctypes

# mallopt's parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap: a 1,024-image response (the most Sample allows by
# default) is 3.2 MB. glibc accepts at most 32 MB here on 64-bit machines.
MMAP_THRESHOLD_BYTES = 16 << 20
# Freed memory kept for reuse before the heap's top is given back to the kernel.
TRIM_THRESHOLD_BYTES = 32 << 20


def reuse_large_blocks() -> bool:
    """Set glibc's thresholds for this process; False where the C library has no mallopt (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
