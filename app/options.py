"""Method options as an editable table: rows built from a method's config dataclass, typed by the library.

The table has one row per config field (name, value, default); the value column is text the user
edits. `personalize.options` types it by the field's annotation, as for the CLI's `--option`, so any
registered method works without UI code.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from personalize import get_method
from personalize.options import coerce_options

COLUMNS = ["option", "value", "default"]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value)
    return str(value)


def _fields(method: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(get_method(method).config_cls))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def defaults(method: str) -> dict[str, Any]:
    """The method's option defaults, with the empty preset shown as the method's default preset."""
    cls = get_method(method)
    values = {f.name: _default(f) for f in _fields(method)}
    if "preset" in values and not values["preset"]:
        values["preset"] = cls.default_preset
    return values


def option_rows(method: str, values: dict[str, Any] | None = None) -> list[list[str]]:
    """One [option, value, default] row per config field, values at the method's defaults except `values`."""
    chosen = values or {}
    return [[name, _text(chosen.get(name, value)), _text(value) or "(none)"] for name, value in defaults(method).items()]


def parse_options(method: str, rows: Any) -> dict[str, Any]:
    """The options that differ from the method's defaults, typed, from table rows (list or DataFrame).

    The text of each row is typed by `personalize.options`, as the CLI's `--option` is (an empty cell
    is "none" where the option accepts none)."""
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame from gr.Dataframe
        rows = rows.values.tolist()
    cls = get_method(method)
    texts = {str(row[0]).strip(): "" if row[1] is None else str(row[1]).strip() for row in rows or [] if row and str(row[0]).strip()}
    typed = coerce_options(cls.config_cls, texts, method)
    known = defaults(method)
    return {name: value for name, value in typed.items() if value != known[name]}
