"""Performance harness behind `personalize bench`: speed, memory and size of every adapter method
on one UNet, with LoRA r=4 as the reference and the frozen UNet as the floor (and, optionally, each
method's step with the text encoder training too, against its UNet-only step).

    from personalize.benchmark import BenchConfig, run_benchmark
    record = run_benchmark(BenchConfig(base_model="tiny", resolution=64, steps=2))
"""

from .config import FLOOR, REFERENCE, BenchConfig, MethodSpec, parse_method_spec, resolve_specs
from .report import markdown_table, text_table, write_chart, write_json, write_markdown
from .runner import MethodResult, run_benchmark

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
