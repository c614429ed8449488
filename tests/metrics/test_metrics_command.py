"""The `personalize eval` subcommand end to end (fresh ArgumentParser, tiny embedders), and import hygiene."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest
from metrics_testdata import manifest_record
from PIL import Image

from metrics import command
from tests.helpers import imported_top_level


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="personalize eval")
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_eval_command_writes_report_markdown_and_plot(make_real, make_generated, tmp_path, capsys):
    real = make_real(n=2)
    generated = make_generated([manifest_record(i, f"a sks dog {i}") for i in range(3)])
    output = tmp_path / "eval" / "report.json"
    args = parse(
        [
            "--real",
            str(real),
            "--generated",
            str(generated),
            "--output",
            str(output),
            "--metrics",
            "dino,clip_i,clip_t,vendi,kid",
            "--embedders",
            "tiny",
            "--placeholder-token",
            "sks",
        ]
    )
    assert command.run(args) == 0
    report = json.loads(output.read_text())
    assert set(report["metrics"]) == {"dino", "clip_i", "clip_t", "vendi", "kid"}
    assert output.with_suffix(".md").read_text().startswith("# Personalization metrics")
    assert Image.open(output.with_suffix(".png")).format == "PNG"
    printed = capsys.readouterr().out
    assert "| run | subjects | real | generated | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | Vendi ↑ | KID ↓ |" in printed
    assert str(output) in printed


def test_eval_command_defaults_and_user_errors(make_real, make_generated, tmp_path):
    args = parse(["--real", "r", "--generated", "g"])
    assert (args.output, args.metrics, args.embedders, args.placeholder_tokens) == (
        "report.json",
        "dino,clip_i,clip_t,vendi",
        "default",
        None,
    )
    with pytest.raises(SystemExit):
        parse(["--real", "r", "--generated", "g", "--embedders", "huge"])
    real, generated = make_real(n=2), make_generated([manifest_record(0, "a sks dog")])
    bad_metric = parse(["--real", str(real), "--generated", str(generated), "--metrics", "dino,fidd", "--embedders", "tiny"])
    with pytest.raises(ValueError, match="'fidd'; accepted: dino, dinov2"):
        command.run(bad_metric)
    missing = parse(["--real", str(tmp_path / "none"), "--generated", str(generated), "--embedders", "tiny"])
    with pytest.raises(FileNotFoundError, match="real image folder not found"):
        command.run(missing)
    into_folder = parse(
        ["--real", str(real), "--generated", str(generated), "--output", str(tmp_path), "--metrics", "dino", "--embedders", "tiny"]
    )
    with pytest.raises(ValueError, match="must be a file path such as report.json"):
        command.run(into_folder)


@pytest.mark.parametrize("where", ["real", "generated", "generated without manifest"])
def test_eval_names_a_decompression_bomb_in_one_line_with_status_2(where, make_real, make_generated, tmp_path, capsys):
    from personalize.cli import main
    from tests.test_data import png_header_only

    real = make_real(n=2)
    generated = make_generated([manifest_record(0, "a dog")], manifest=where != "generated without manifest")
    bomb = png_header_only((real if where == "real" else generated) / "0000.png", 20_000, 20_000)  # 400 MP claimed
    argv = ["eval", "--real", str(real), "--generated", str(generated), "--output", str(tmp_path / "report.json")]
    assert main([*argv, "--metrics", "dino", "--embedders", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: image {bomb} is too large to evaluate (") and "downscale" in err[0], err


PACKAGE = Path(__file__).resolve().parents[2] / "metrics"
PURE_MATH = {"matrix", "similarity", "vendi", "frechet", "kid"}


def test_metrics_never_imports_personalize_or_gradio_and_math_stays_pure():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files
    for path in files:
        imports = imported_top_level(path)
        assert not imports & {"personalize", "gradio"}, path
        if path.stem in PURE_MATH and path.parent == PACKAGE:
            assert imports <= {"__future__", "math", "typing", "numpy", "metrics"}, (path, imports)
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no module docstring"
