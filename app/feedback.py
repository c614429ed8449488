"""How callbacks report problems and numbers: user errors become visible messages, never tracebacks.

`guarded` wraps a Gradio callback: the user errors of `personalize.errors.USER_ERRORS` (the list the
CLI uses too) turn into a `gr.Error` with the library's message; anything unexpected is logged with its
traceback and shown as one line. The formatting helpers keep numbers readable in every tab.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

import gradio as gr

from personalize.errors import USER_ERRORS, user_message

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def message_of(exc: BaseException) -> str:
    """One line for the UI: the library's message for user errors, the type and message otherwise."""
    if isinstance(exc, USER_ERRORS):
        return user_message(exc)
    return f"unexpected error: {type(exc).__name__}: {exc} (details in the app's log)"


def guarded(fn: F) -> F:
    """Turn exceptions raised by a callback into visible `gr.Error` messages."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            if not isinstance(exc, USER_ERRORS):
                log.exception("callback %s failed", fn.__name__)
            raise gr.Error(message_of(exc), duration=None) from None

    return wrapper  # type: ignore[return-value]


def human_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "–"
    units = ("B", "kB", "MB", "GB")
    size, unit = float(num_bytes), 0
    while size >= 1000 and unit < len(units) - 1:
        size, unit = size / 1000, unit + 1
    return f"{int(size)} B" if unit == 0 else f"{size:.1f} {units[unit]}"


def human_count(count: int | None) -> str:
    return "–" if count is None else f"{count:,}"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
