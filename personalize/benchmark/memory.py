"""Peak memory of a stretch of work: the CUDA allocator's peak on GPUs, the resident set on CPUs.

On Linux the kernel's RSS high-water mark is reset before the work (`/proc/self/clear_refs`) and read
after it (`VmHWM`), so nothing polls while the step runs; elsewhere a thread samples the RSS. Freed
heap pages are handed back to the OS before each reading (glibc `malloc_trim`), so the baseline is
not inflated by what earlier methods left in the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from pathlib import Path

import torch

_PROC = Path("/proc/self")
MB = 2**20


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def _proc_status_kb(field: str) -> int:
    for line in (_PROC / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _hwm_resettable() -> bool:
    try:
        (_PROC / "clear_refs").write_text("5")  # "5" resets the peak RSS (Linux >= 4.0)
        _proc_status_kb("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes`: the peak over `peak.baseline`.

    `baseline` is the memory in use at `mark()` (or on entering, if `mark()` was not called), so
    memory allocated between the mark and the block (the adapter's buffers) counts too.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.linux = not self.cuda and _hwm_resettable()
        self.baseline: int | None = None
        self.bytes = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0

    def current(self) -> int:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        _malloc_trim()
        import psutil

        return psutil.Process().memory_info().rss

    def mark(self) -> None:
        self.baseline = self.current()

    def __enter__(self) -> "PeakMemory":
        now = self.current()
        if self.baseline is None:
            self.baseline = now
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.linux:
            (_PROC / "clear_refs").write_text("5")
        else:
            self._sampled = now
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.linux:
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            self._stop.set()
            assert self._sampler is not None
            self._sampler.join()
            peak = self._sampled
        assert self.baseline is not None
        self.bytes = max(0, peak - self.baseline)
