"""The machine and software a benchmark ran on, recorded with its numbers."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from ..machine import cpu_name


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (a busy, shared machine makes timings noisy); None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device, compute_dtype: torch.dtype, weight_dtype: torch.dtype) -> dict:
    import psutil

    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "weight_dtype": str(weight_dtype).removeprefix("torch."),
        "autocast": compute_dtype != torch.float32,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "peft": _version("peft"),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info
