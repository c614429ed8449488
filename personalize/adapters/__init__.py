"""Adapter methods, one module each, registered by name in `base.METHOD_REGISTRY`."""

from __future__ import annotations

import importlib

from .base import METHOD_REGISTRY, AdapterConfig, LayerAdapter, Method, get_method, register

# Modules that register a method when imported; a new method adds its module name here.
METHOD_MODULES = ("svfit", "loldu", "lora")


def ensure_registered() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def method_names() -> tuple[str, ...]:
    ensure_registered()
    return tuple(sorted(METHOD_REGISTRY))


__all__ = ["AdapterConfig", "LayerAdapter", "Method", "METHOD_REGISTRY", "get_method", "method_names", "register"]
