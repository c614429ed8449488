"""A process-wide choice among named modes: read from an environment variable, overridable in a block."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import UserError


class Mode:
    """`get()`: the innermost `using(mode)` block's mode, else `$env`, else `default`."""

    def __init__(self, env: str, modes: tuple[str, ...], default: str, what: str) -> None:
        self.env, self.modes, self.default, self.what = env, modes, default, what
        self._override: str | None = None

    def get(self) -> str:
        mode = self._override or os.environ.get(self.env) or self.default
        if mode not in self.modes:
            raise UserError(f"{self.env}={mode!r} is not a {self.what}; accepted: {', '.join(self.modes)}")
        return mode

    @contextmanager
    def using(self, mode: str) -> Iterator[None]:
        if mode not in self.modes:
            raise UserError(f"unknown {self.what} '{mode}'; accepted: {', '.join(self.modes)}")
        previous, self._override = self._override, mode
        try:
            yield
        finally:
            self._override = previous
