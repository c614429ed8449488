"""Method options: one parser and type checker for every way options arrive.

`coerce_options(config_cls, options, method)` reads each option against the annotation of the
method config dataclass's field (int, float, bool, str, `Literal[...]`, `X | None`, tuples and
lists of those) and returns typed values. It accepts text (the CLI's `--option rank=8`, the app's
options table) as well as typed values (TOML `[method_options]`, `config.json` of an earlier run,
`attach(**options)` in Python). Anything else is a `UserError` naming the option, the method and
what is accepted. Ranges (rank >= 1, ...) stay with each method's `validate`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from .errors import UserError

NONE_WORDS = ("none", "null")
TRUE_WORDS = ("true", "yes", "on")
FALSE_WORDS = ("false", "no", "off")


class _Rejected(Exception):
    """Internal: the value does not fit one alternative of an annotation."""


def coerce_options(config_cls: type, options: Mapping[str, Any], method: str) -> dict[str, Any]:
    """`options` typed by the fields of the dataclass `config_cls`; unknown names and bad values raise."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)} for method '{method}'; accepted: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(config_cls)
    typed = {}
    for name, value in options.items():
        try:
            typed[name] = coerce(value, hints[name])
        except _Rejected:
            raise UserError(f"option '{name}' of method '{method}' must be {describe(hints[name])}, got {value!r}") from None
    return typed


def coerce(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` describes, reading text where the value is text; `_Rejected` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or _is_none_word(value)):
            return None
        for alternative in (a for a in args if a is not type(None)):  # first fitting alternative wins
            try:
                return coerce(value, alternative)
            except _Rejected:
                continue
        raise _Rejected
    if origin is typing.Literal:
        for allowed in args:
            try:
                if coerce(value, type(allowed)) == allowed:
                    return allowed
            except _Rejected:
                continue
        raise _Rejected
    if origin in (tuple, list):
        return _sequence(value, origin, args)
    if hint is type(None):
        if value is None or _is_none_word(value):
            return None
        raise _Rejected
    if hint is bool:
        return _bool(value)
    if hint is int:
        return _int(value)
    if hint is float:
        return _float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Rejected
    if hint is Any:
        return value
    raise TypeError(f"option annotation {hint!r} is not supported by personalize.options")  # a method bug, not the user's


def describe(hint: Any) -> str:
    """What a value for `hint` may be, in words: 'an integer or none', 'one of ldu, uniform'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (tuple, list):
        items = args[:1] if len(args) == 2 and args[1] is Ellipsis or origin is list else args
        inner = " and ".join(describe(a) for a in items) or "values"
        count = f"{len(args)} " if origin is tuple and args and args[-1] is not Ellipsis else ""
        return f"a list of {count}items, each {inner} (e.g. 1,2 or [1, 2])"
    return {
        type(None): "none",
        bool: "true or false",
        int: "an integer (a whole number, not true/false)",
        float: "a finite number",
        str: "text",
        Any: "any value",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def _is_none_word(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in NONE_WORDS + ("",)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise _Rejected  # 1 and 0 are not accepted: a bool is not an int


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Rejected
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _Rejected from None
    raise _Rejected  # a float (2.5, and also 2.0) is not an integer option


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Rejected
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _Rejected from None
    else:
        raise _Rejected
    if not math.isfinite(number):
        raise _Rejected
    return number


def _sequence(value: Any, origin: type, args: tuple) -> tuple | list:
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        value = [part.strip() for part in text.split(",")] if text else []
    if not isinstance(value, (list, tuple)):
        raise _Rejected
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _Rejected
        kinds = args
    else:
        kinds = (args[0] if args else Any,) * len(value)
    items = [coerce(item, kind) for item, kind in zip(value, kinds)]
    return tuple(items) if origin is tuple else items
