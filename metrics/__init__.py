"""Personalization metrics: DINO, CLIP-I, CLIP-T, Vendi, KID, FID, with reports, plots and the eval command."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# Public name -> the module that defines it, imported on first use (`personalize eval --help` loads no torch).
_HOMES = {
    "dreambench_prompts": "dreambench",
    "load_dreambench": "dreambench",
    "ImageEmbedder": "embedders",
    "ImageTextEmbedder": "embedders",
    "default_embedders": "embedders",
    "load_embedder": "embedders",
    "tiny_embedders": "embedders",
    "frechet_distance": "frechet",
    "KernelDistance": "kid",
    "kernel_inception_distance": "kid",
    "markdown_report": "report",
    "markdown_table": "report",
    "write_comparison": "report",
    "write_report": "report",
    "mean_pairwise_cosine": "similarity",
    "pairwise_cosine": "similarity",
    "rowwise_cosine": "similarity",
    "vendi_score": "vendi",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES) | {"evaluate"})


class _Package(types.ModuleType):
    """This package's module type: `metrics.evaluate` is the function `evaluate.evaluate`, also after its
    submodule of the same name is imported (the import system then sets the attribute to the module)."""

    @property
    def evaluate(self) -> Any:
        return importlib.import_module(f"{__name__}.evaluate").evaluate

    @evaluate.setter
    def evaluate(self, submodule: types.ModuleType) -> None:
        pass  # the submodule stays reachable as sys.modules["metrics.evaluate"] and `from metrics.evaluate import ...`


sys.modules[__name__].__class__ = _Package


__all__ = [
    "ImageEmbedder",
    "ImageTextEmbedder",
    "KernelDistance",
    "default_embedders",
    "dreambench_prompts",
    "evaluate",
    "frechet_distance",
    "kernel_inception_distance",
    "load_dreambench",
    "load_embedder",
    "markdown_report",
    "markdown_table",
    "mean_pairwise_cosine",
    "pairwise_cosine",
    "rowwise_cosine",
    "tiny_embedders",
    "vendi_score",
    "write_comparison",
    "write_report",
]
