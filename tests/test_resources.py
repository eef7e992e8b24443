"""The allocator policy for encoding: freed large blocks are reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

CYCLES = """
import ctypes, ctypes.util, resource, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "keep":
    from ratta.resources import keep_freed_memory
    keep_freed_memory()
    keep_freed_memory()  # idempotent
size = 64 << 20  # larger than glibc's largest default mmap threshold (32 MiB)
def cycle():
    p = libc.malloc(size)
    libc.memset(p, 1, size)
    libc.free(p)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(policy: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CYCLES, policy], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks() -> None:
    default, kept = _faults("default"), _faults("keep")
    # 8 cycles of 64 MiB: glibc's default maps and unmaps each block (8 x 16,384 pages
    # faulted in, fewer with huge pages); with the policy the first block is reused.
    assert default >= 8 * 32
    assert kept * 8 <= default
