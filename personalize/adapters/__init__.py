"""Adapter methods, one module each, registered by name in `base.METHOD_REGISTRY`.

What each method offers its users (options, presets, defaults) is declared in `declarations/`,
which imports without torch. Importing this package is light too: the method modules (and torch)
load at the first `get_method`, `method_names` or use of a name from `base`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from .declarations import declaration

if TYPE_CHECKING:
    from .base import Method

_CORE_MODULES = {"base"}
_BASE_NAMES = ("AdapterConfig", "LayerAdapter", "Method", "METHOD_REGISTRY", "register")  # from `base`, on first use


def ensure_registered() -> None:
    """Import every method module of this package; each registers itself with `@register`."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _CORE_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> tuple[str, ...]:
    from .base import METHOD_REGISTRY

    ensure_registered()
    return tuple(sorted(METHOD_REGISTRY))


def get_method(name: str) -> type[Method]:
    """The registered method `name`; an unknown name is a UserError naming the accepted ones."""
    from .base import METHOD_REGISTRY

    declaration(name)  # raises for an unknown name before the method modules load
    ensure_registered()
    return METHOD_REGISTRY[name]


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        return getattr(importlib.import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AdapterConfig", "LayerAdapter", "Method", "METHOD_REGISTRY", "get_method", "method_names", "register"]
