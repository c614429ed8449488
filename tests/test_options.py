"""Method options: one parser for the CLI's text, TOML values, the app's table and `attach(**options)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

import personalize as P
from personalize import get_method
from personalize.commands.train import parse_options
from personalize.errors import UserError
from personalize.models import tiny_unet
from personalize.options import coerce_options


@dataclass
class Example:
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    name: str = "x"
    mode: Literal["fast", "exact"] = "fast"
    rank: int | None = None
    size: tuple[int, int] = (1, 1)
    widths: tuple[int, ...] = ()


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"count": "8"}, {"count": 8}),
        ({"count": 8}, {"count": 8}),
        ({"ratio": "2"}, {"ratio": 2.0}),
        ({"ratio": 2}, {"ratio": 2.0}),
        ({"flag": "true"}, {"flag": True}),
        ({"flag": "off"}, {"flag": False}),
        ({"flag": False}, {"flag": False}),
        ({"mode": "exact"}, {"mode": "exact"}),
        ({"rank": "none"}, {"rank": None}),
        ({"rank": ""}, {"rank": None}),
        ({"rank": None}, {"rank": None}),
        ({"rank": "4"}, {"rank": 4}),
        ({"size": "2,3"}, {"size": (2, 3)}),
        ({"size": [2, 3]}, {"size": (2, 3)}),
        ({"widths": "[4, 5, 6]"}, {"widths": (4, 5, 6)}),
    ],
)
def test_text_and_typed_values_are_read_by_annotation(options, expected):
    assert coerce_options(Example, options, "example") == expected


@pytest.mark.parametrize(
    "name, value, accepted",
    [
        ("count", "abc", "an integer"),
        ("count", 2.5, "an integer"),
        ("count", "2.5", "an integer"),
        ("count", True, "an integer"),  # a bool is not an int
        ("ratio", "abc", "a finite number"),
        ("ratio", "nan", "a finite number"),
        ("ratio", True, "a finite number"),
        ("flag", 1, "true or false"),
        ("flag", "maybe", "true or false"),
        ("name", 3, "text"),
        ("mode", "slow", "one of fast, exact"),
        ("rank", "x", "an integer .* or none"),
        ("size", "1,2,3", "a list of 2 items"),
    ],
)
def test_bad_values_name_option_method_and_what_is_accepted(name, value, accepted):
    with pytest.raises(UserError, match=rf"option '{name}' of method 'example' must be {accepted}.*got {value!r}"):
        coerce_options(Example, {name: value}, "example")


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(UserError, match="unknown option.*depth.*'example'; accepted: count"):
        coerce_options(Example, {"depth": 2}, "example")


@pytest.mark.parametrize("value", ["abc", "2.5", "true"])
def test_cli_option_of_wrong_type_is_one_line_exit_2(value, capsys):
    from personalize.cli import main

    assert main(["train", "--instance-images", "x", "--output-dir", "y", "--option", f"rank={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "option 'rank' of method 'lora' must be an integer" in err


def test_cli_text_reaches_the_method_typed():
    options = parse_options(["rank=8", "alpha=4.5", 'init="uniform"', "targets=none"])
    config = get_method("loldu").make_config({k: v for k, v in options.items() if k != "targets"})
    assert (config.rank, config.alpha, config.init) == (8, 4.5, "uniform")
    assert get_method("svfit").make_config({"rank": options["targets"]}).rank is None


def test_atoms_configuration_fills_options_given_as_none_text():
    config = get_method("atoms").make_config({"preset": "c1", "m": "none", "kc": "none"})
    assert (config.m, config.kc) == (6, 4)


def test_attach_checks_python_values():
    with pytest.raises(UserError, match="option 'rank' of method 'lora' must be an integer"):
        P.attach(tiny_unet("sd1"), "lora", rank=2.5)
