"""Method options table: built from every registered method's config, parsed back by field type."""

from __future__ import annotations

import dataclasses

import pytest

from app.options import defaults, option_rows, parse_options
from personalize import METHODS, get_method
from personalize.errors import UserError


@pytest.mark.parametrize("method", METHODS)
def test_default_rows_round_trip_to_no_options(method):
    rows = option_rows(method)
    assert [row[0] for row in rows] == [f.name for f in dataclasses.fields(get_method(method).config_cls)]
    assert parse_options(method, rows) == {}
    get_method(method).make_config(parse_options(method, rows))  # accepted by the method


def test_values_are_typed_and_only_changes_are_returned():
    rows = [["rank", "8"], ["alpha", "2.5"], ["preset", "attention"], ["targets", ""]]
    assert parse_options("lora", rows) == {"rank": 8, "alpha": 2.5}
    assert defaults("lora")["preset"] == get_method("lora").default_preset


def test_rows_with_chosen_values_parse_back_to_them():
    rows = option_rows("lora", {"preset": "attention_convs"})
    assert ["preset", "attention_convs", "attention"] in rows  # the default column still shows the default
    assert parse_options("lora", rows) == {"preset": "attention_convs"}


def test_optional_fields_accept_empty():
    method = next(
        m for m in METHODS if any(f.default is None and f.name != "targets" for f in dataclasses.fields(get_method(m).config_cls))
    )
    name = next(f.name for f in dataclasses.fields(get_method(method).config_cls) if f.default is None and f.name != "targets")
    assert parse_options(method, [[name, ""]]) == {}
    assert parse_options(method, [[name, "3"]]) == {name: 3}


def test_bad_values_name_the_option():
    with pytest.raises(UserError, match="option 'rank' of method 'lora' must be an integer.*got 'abc'"):
        parse_options("lora", [["rank", "abc"]])
    with pytest.raises(UserError, match="option 'rank' of method 'lora' must be an integer.*got ''"):
        parse_options("lora", [["rank", ""]])
    with pytest.raises(UserError, match="option 'alpha' of method 'lora' must be a finite number.*got 'inf'"):
        parse_options("lora", [["alpha", "inf"]])
    with pytest.raises(UserError, match="unknown option.*depth.*'lora'"):
        parse_options("lora", [["depth", "2"]])
