"""Method options as an editable table: rows built from a method's config dataclass, parsed back by type.

The table has one row per config field (name, value, default); the value column is text the user
edits. Parsing follows the field's annotated type, so any registered method works without UI code.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from personalize import get_method
from personalize.errors import UserError

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


def option_rows(method: str) -> list[list[str]]:
    """One [option, value, default] row per config field, values at the method's defaults."""
    return [[name, _text(value), _text(value) or "(none)"] for name, value in defaults(method).items()]


def _allowed(annotation: Any) -> tuple[list[type], bool]:
    """The concrete types an annotation allows, and whether None is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def _convert(name: str, text: str, kinds: list[type]) -> Any:
    errors = []
    for kind in kinds:
        base = typing.get_origin(kind) or kind
        try:
            if base is bool:
                lowered = text.lower()
                if lowered in ("true", "yes", "1", "on"):
                    return True
                if lowered in ("false", "no", "0", "off"):
                    return False
                raise ValueError(text)
            if base is int:
                return int(text)
            if base is float:
                return float(text)
            if base is str:
                return text
            if base in (list, tuple, dict):
                value = json.loads(text)
                if not isinstance(value, (list, dict)):
                    raise ValueError(text)
                return base(value) if base is tuple else value
        except (ValueError, json.JSONDecodeError):
            errors.append(getattr(base, "__name__", str(base)))
    raise UserError(f"option {name}: '{text}' is not a valid value; accepted: {' or '.join(errors) or 'text'}")


def parse_options(method: str, rows: Any) -> dict[str, Any]:
    """The options that differ from the method's defaults, typed, from table rows (list or DataFrame)."""
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame from gr.Dataframe
        rows = rows.values.tolist()
    cls = get_method(method)
    hints = typing.get_type_hints(cls.config_cls)
    known = defaults(method)
    chosen: dict[str, Any] = {}
    for row in rows or []:
        if not row or not str(row[0]).strip():
            continue
        name, text = str(row[0]).strip(), "" if row[1] is None else str(row[1]).strip()
        if name not in known:
            raise UserError(f"unknown option '{name}' for method '{method}'; accepted: {', '.join(known)}")
        kinds, optional = _allowed(hints[name])
        if text == "" or text.lower() == "none":
            if not optional and kinds != [str]:
                raise UserError(f"option {name} needs a value (default {_text(known[name])})")
            value = None if optional else ""
        else:
            value = _convert(name, text, kinds)
        if value != known[name]:
            chosen[name] = value
    return chosen
