"""The machine a computation runs on, named: what the benchmark reports and what keys per-machine caches."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """`cuda: NVIDIA H100 80GB HBM3`, `cpu: AMD EPYC 7B13 (2 threads)`: what decides which kernels are fast.
    A CPU's name includes torch's thread count, which changes the relative speed of kernels as much."""
    if device.type == "cuda":
        return f"cuda: {_gpu_name(device.index if device.index is not None else torch.cuda.current_device())}"
    if device.type == "cpu":
        return f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"
    return f"{device.type}: {platform.machine()}"


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)
