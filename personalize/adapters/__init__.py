"""Adapter methods, one module each, registered by name in `base.METHOD_REGISTRY`."""

from __future__ import annotations

import importlib
import pkgutil

from .base import METHOD_REGISTRY, AdapterConfig, LayerAdapter, Method, get_method, register

_CORE_MODULES = {"base"}


def ensure_registered() -> None:
    """Import every method module of this package; each registers itself with `@register`."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _CORE_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> tuple[str, ...]:
    ensure_registered()
    return tuple(sorted(METHOD_REGISTRY))


__all__ = ["AdapterConfig", "LayerAdapter", "Method", "METHOD_REGISTRY", "get_method", "method_names", "register"]
