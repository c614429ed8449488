"""An instant CLI: parsing, help, argument errors, `methods` and `cache` load no torch, diffusers or
other heavy library (each subcommand imports those in its `run`), and `methods` still shows what
the registered method classes hold."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import personalize as P
from personalize.adapters import get_method
from personalize.cli import main

# Measured on a 2-core CPU: torch + diffusers take 6-9 s to import; numpy, PIL and tqdm 0.2-0.3 s each.
HEAVY = ("torch", "diffusers", "transformers", "peft", "safetensors", "gradio", "matplotlib", "numpy", "PIL", "tqdm")

LIGHT_RUN = f"""
import contextlib, io, sys
from personalize.cli import build_parser, main

parser, modules = build_parser()
assert len(modules) == 9, sorted(modules)  # every subcommand, eval and app included
for argv in (["--help"], *[[name, "--help"] for name in modules], ["train", "--steps", "abc"], ["bogus"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pass
for argv in (["methods"], ["methods", "svfit"], ["cache"]):
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0, argv
print(sorted(name for name in {HEAVY!r} if name in sys.modules))
"""


def test_parser_help_errors_methods_and_cache_import_no_heavy_library():
    result = subprocess.run([sys.executable, "-c", LIGHT_RUN], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported by the light commands: {result.stdout.strip()}"


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    expected = [f"{name:12s} {get_method(name).description}" for name in P.METHODS]
    assert capsys.readouterr().out.splitlines() == expected


def test_method_detail_shows_what_the_registered_class_holds(capsys):
    for name in P.METHODS:
        method = get_method(name)
        assert main(["methods", name]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines == [
            f"{name:12s} {method.description}",
            f"  presets: {', '.join(method.presets)} (default {method.default_preset})",
            *(f"  --option {field.name}={field.default!r}" for field in dataclasses.fields(method.config_cls)),
            *(f"  note: {note}" for note in method.notes),
            f"  training defaults: lr {method.train_defaults.lr:g}, {method.train_defaults.steps} steps ({method.train_defaults.source})",
        ]


def test_method_detail_is_unchanged(capsys):
    assert main(["methods", "atoms"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "atoms        Filter subspace (paper configurations c1/c2/c3): filter atoms on 3x3 convs + Kronecker atoms on attention",
        "  presets: c1, c2, c3 (default c2)",
        "  --option preset=''",
        "  --option targets=None",
        "  --option m=None",
        "  --option m1=None",
        "  --option m_c=None",
        "  --option kc=None",
        "  --option tune_coefficients=False",
        "  training defaults: lr 0.001, 1000 steps (filter-atoms.txt §4.3: AdamW lr 1e-3, 1000 steps (SD few-shot))",
    ]


def test_lazy_packages_keep_their_public_names():
    import metrics
    import metrics.evaluate  # the submodule: importing it must not replace the package's `evaluate` function

    assert metrics.evaluate is sys.modules["metrics.evaluate"].evaluate
    assert P.load_pipeline is sys.modules["personalize.models"].load_pipeline
    assert P.METHODS == tuple(sorted(P.METHODS)) and "svfit" in P.METHODS
