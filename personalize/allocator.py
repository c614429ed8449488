"""Steadier, faster CPU memory allocation for UNet training and inference on Linux (glibc).

By default glibc serves every allocation above a moving threshold (128 KiB, raised to at most 32
MiB as large blocks are freed) with a fresh `mmap`, whose pages the kernel faults in and zeroes
on first touch, and gives it back on free. A UNet step allocates and frees hundreds of activation
tensors of 1-100 MiB, so it pays those page faults on every step, and how many depends on what the
process happened to free before. Measured on the SD 1.5 UNet at 256 px, one CPU thread: inference
2.13 s -> 1.79 s, a frozen training step 4.40 s -> 3.68 s with the fixed thresholds below.
The cost: up to `TRIM_THRESHOLD` of freed memory stays with the process for reuse.
"""

from __future__ import annotations

import sys

MMAP_THRESHOLD = 256 << 20  # blocks below 256 MiB come from the heap and are reused
TRIM_THRESHOLD = 512 << 20  # free memory at the top of the heap kept for reuse before returning it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
# glibc's soname, loaded by name: ctypes.util.find_library("c") would run `ldconfig -p` in a subprocess
# at every start of the CLI. Another C library (musl) has another name or no mallopt: nothing is tuned.
GLIBC = "libc.so.6"

_tuned = False


def tune_cpu_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once); False where not glibc/Linux."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # here, not at the top: the CLI's help and argument errors never load it

    try:
        libc = ctypes.CDLL(GLIBC)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
