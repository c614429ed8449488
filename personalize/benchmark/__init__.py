"""Performance harness behind `personalize bench`: speed, memory and size of every adapter method
on one UNet, with LoRA r=4 as the reference and the frozen UNet as the floor (and, optionally, each
method's step with the text encoder training too, against its UNet-only step).

    from personalize.benchmark import BenchConfig, run_benchmark
    record = run_benchmark(BenchConfig(base_model="tiny", resolution=64, steps=2))
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it, imported on first use (`personalize bench --help` loads no torch).
_HOMES = {
    "FLOOR": "config",
    "REFERENCE": "config",
    "BenchConfig": "config",
    "MethodSpec": "config",
    "parse_method_spec": "config",
    "resolve_specs": "config",
    "markdown_table": "report",
    "text_table": "report",
    "write_chart": "report",
    "write_json": "report",
    "write_markdown": "report",
    "MethodResult": "runner",
    "run_benchmark": "runner",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "FLOOR",
    "REFERENCE",
    "BenchConfig",
    "MethodResult",
    "MethodSpec",
    "markdown_table",
    "parse_method_spec",
    "resolve_specs",
    "run_benchmark",
    "text_table",
    "write_chart",
    "write_json",
    "write_markdown",
]
