"""glibc's thresholds: after reuse_large_blocks, a response-sized block comes from the heap, not a mapping."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc 2.33+ (mallinfo2)"
)

# Prints how many blocks glibc maps on their own (mallinfo2's hblks) while an 8 MB block is held.
PROBE = """
import ctypes, sys
from service.allocator import reuse_large_blocks

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    assert reuse_large_blocks()
before = libc.mallinfo2().hblks
block = libc.malloc(8 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def _mapped_blocks(mode: str) -> int:
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=root
    )
    return int(done.stdout)


def test_a_fresh_process_maps_a_large_block_on_its_own() -> None:
    assert _mapped_blocks("default") == 1


def test_after_reuse_large_blocks_the_same_block_comes_from_the_heap() -> None:
    assert _mapped_blocks("tuned") == 0
