"""`personalize bench --quality` end to end on a minimal budget: one method, one subject per tier, two
steps; a sweep of two values; the sweep's typed values, winner rule and one-line errors.

Checks the record's rows (the ceiling's and shares of it included), the markdown tables and that every
grid column holds images; the numbers themselves are measured by the full run (BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex

import numpy as np
import pytest
from PIL import Image

from personalize.benchmark import sweep as S
from personalize.benchmark.quality import (
    BASE,
    CEILING,
    INSTANCES,
    QualityConfig,
    Scores,
    gallery_grid,
    markdown,
    run_quality,
    table_row,
)
from personalize.cli import main
from personalize.shapes import recipe
from personalize.shapes import world as W

MINIMAL = dict(steps=2, images_per_background=1, sample_steps=4, base_images=0)  # 4 sample steps: the ceiling reads some subjects


def used(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def check_shares(rows: list[dict]) -> None:
    """Each row's per-subject share of ceiling is its fidelity over the ceiling row's (NaN where that is 0), their mean the row's."""
    ceiling = next(r for r in rows if r["label"] == CEILING)["per_concept"]
    for row in rows:
        shares = []
        for name, scores in row["per_concept"].items():
            top = ceiling[name]["fidelity"]
            want = scores["fidelity"] / top if top > 0 else math.nan
            assert scores["share_of_ceiling"] == pytest.approx(want, nan_ok=True), (row["label"], name)
            shares += [want] if top > 0 else []
        assert row["share_of_ceiling"] == pytest.approx(np.mean(shares) if shares else math.nan, nan_ok=True), row["label"]


def test_minimal_quality_run_both_tiers(tmp_path):
    """A subject and a new-outline concept, LoRA at its tuned setting and at its paper default: two tables,
    the subject tier's with the explicit-prompt ceiling and shares of it, a grid per tier."""
    config = QualityConfig(
        work_dir=str(tmp_path), methods=["lora"], concepts=["red-striped-star", "pink-heart"], paper_defaults=True, **MINIMAL
    )
    record = run_quality(config, diversity=lambda features: float(len(features)))
    subjects, outlines = record["tiers"][W.SUBJECT_TIER], record["tiers"][W.OUTLINES]
    assert subjects["concepts"] == ["red-striped-star"] and outlines["concepts"] == ["pink-heart"]
    labels = ["lora", "lora (paper default)"]
    assert [r["label"] for r in subjects["rows"]] == [INSTANCES, BASE, CEILING, *labels]
    assert [r["label"] for r in outlines["rows"]] == [INSTANCES, BASE, *labels]
    check_shares(subjects["rows"])
    tuned, paper = subjects["rows"][3:]
    assert (tuned["kind"], paper["kind"]) == ("tuned", "paper") and tuned["trainable"] > paper["trainable"] > 0
    assert tuned["scores"]["images"] == len(W.UNSEEN_BACKGROUNDS) and tuned["file_bytes"] > 0
    for concept in ("red-striped-star", "pink-heart"):  # the settings reached training
        at_tuned, at_paper = used(tmp_path / "runs" / "lora" / concept), used(tmp_path / "runs" / "lora-paper-default" / concept)
        assert at_tuned["method_options"]["preset"] == "attention_convs" and at_paper["method_options"]["preset"] == "attention"
        assert at_tuned["lr"] == pytest.approx(recipe.learning_rate("lora", recipe.TUNED["lora"].lr_factor))
        assert at_paper["lr"] == pytest.approx(recipe.learning_rate("lora", 1.0)) and at_tuned["steps"] == at_paper["steps"] == 2
    assert np.isnan(subjects["rows"][0]["scores"]["alignment"])  # the instance images are not prompted
    text = markdown(record)
    assert text.index("Subject tier") < text.index("New-outline tier") and "fidelity / its ceiling's, averaged" in text
    assert "| explicit prompt (ceiling) |" in text and "| lora (paper default) | paper: 1x lr, 2 steps |" in text

    cell, header, n_inst, n_bg = 64, 14, 4, len(W.UNSEEN_BACKGROUNDS)
    for table, columns in ((subjects, 4), (outlines, 3)):  # base, (ceiling,) lora, paper: each a block after the instances
        grid = np.asarray(Image.open(table["grid"]).convert("L"))
        for column in range(columns):
            left = (n_inst * cell + 4) + column * (n_bg * cell + 4)
            block = grid[header:, left : left + n_bg * cell]
            assert (block < 250).mean() > 0.5, f"{table['grid']} column {column} is blank"


def test_share_of_ceiling_guards_a_zero_ceiling():
    def scores(fidelity: float) -> Scores:
        return Scores(fidelity, 0.5, 1.0, 2.0, 3)

    a, b = W.SUBJECTS[:2]
    row = table_row("x", [(a, scores(0.3)), (b, scores(0.5))], {a.name: 0.6, b.name: 0.0})
    assert row["per_concept"][a.name]["share_of_ceiling"] == pytest.approx(0.5)
    assert math.isnan(row["per_concept"][b.name]["share_of_ceiling"]) and row["share_of_ceiling"] == pytest.approx(0.5)
    assert row["scores"]["fidelity"] == pytest.approx(0.4)
    assert math.isnan(table_row("y", [(b, scores(0.5))], {b.name: 0.0})["share_of_ceiling"])
    assert "share_of_ceiling" not in table_row("z", [(a, scores(0.3))], None)  # the new-outline tier has no ceiling


def test_sweep_of_two_values_writes_the_table_and_a_winner(tmp_path):
    sweep = S.parse_sweep(["lr_factor=10,40"], ["lora"])
    assert sweep == {"lr_factor": [10.0, 40.0]}
    config = QualityConfig(work_dir=str(tmp_path), methods=["lora:preset=attention"], concepts=["red-striped-star"], **MINIMAL)
    command = "personalize bench --quality --methods lora:preset=attention --sweep lr_factor=10,40"
    record = S.run_sweep(config, sweep, lambda features: float(len(features)), command=command)
    labels = ["lora:preset=attention lr_factor=10", "lora:preset=attention lr_factor=40"]
    assert [r["label"] for r in record["rows"]] == [INSTANCES, BASE, CEILING, *labels]
    check_shares(record["rows"])
    for label, factor in zip(labels, (10, 40)):  # each point reached training, on top of the spec's options
        config_json = used(tmp_path / "runs" / label.replace(":", "-").replace("=", "-").replace(" ", "-") / "red-striped-star")
        assert (
            config_json["lr"] == pytest.approx(recipe.learning_rate("lora", factor))
            and config_json["method_options"]["preset"] == "attention"
        )
    won = record["winners"]["lora:preset=attention"]
    rows = {r["label"]: r for r in record["rows"]}
    assert won["label"] == S.winner([rows[label] for label in labels])[0]["label"]
    entry = won["entry"]
    assert entry.startswith("'lora': Tuned(lr_factor=") and f"source={command!r}" in entry and "'preset': 'attention'" in entry
    text = S.markdown(record)
    assert S.RULE in text and f"| **{won['label']}** |" in text and entry in text and f"Command: `{command}`" in text
    assert Image.open(record["grid"]).size[0] > 0


def test_winner_rule():
    def row(label: str, share: float, alignment: float) -> dict:
        return {"label": label, "share_of_ceiling": share, "scores": {"alignment": alignment}}

    rows = [row("a", 0.9, 0.5), row("b", 0.6, 0.8), row("c", 0.7, 0.7), row("d", math.nan, 1.0)]
    assert S.winner(rows)[0]["label"] == "c"  # the best share among alignment >= 0.7, though a's share is higher
    assert S.winner([row("a", 0.9, 0.5), row("b", 0.6, 0.6), row("e", 1.0, 0.3)])[0]["label"] == "a"  # none aligned: share x alignment
    assert S.winner([row("d", math.nan, 1.0)]) is None


def test_sweep_values_are_typed_by_their_owner():
    sweep = S.parse_sweep(["snr_gamma=none,5", "rank=4,8", "prior=none,model", "captions=true,false", "steps=150,300"], ["lora", "svfit"])
    assert sweep == {"snr_gamma": [None, 5.0], "rank": [4, 8], "prior": ["none", "model"], "captions": [True, False], "steps": [150, 300]}
    assert len(S.points(sweep)) == 32 and S.points(sweep)[1] == {
        "snr_gamma": None,
        "rank": 4,
        "prior": "none",
        "captions": True,
        "steps": 300,
    }
    tuned = S.apply(recipe.setting("lora"), S.points(sweep)[1], "lora")
    settings = tuned.train_settings("lora")
    assert (
        settings["snr_gamma"] is None
        and settings["method_options"] == {"preset": "attention_convs", "rank": 4}
        and settings["steps"] == 300
    )


def test_recipe_starts_from_the_tuned_setting():
    lora, svfit = recipe.train_settings("lora"), recipe.train_settings("svfit")
    tuned = recipe.TUNED["lora"]
    assert lora["method_options"] == tuned.options and lora["steps"] == tuned.steps and tuned.source
    assert lora["lr"] == pytest.approx(recipe.learning_rate("lora", tuned.lr_factor))
    assert "svfit" not in recipe.TUNED and svfit["lr"] == pytest.approx(recipe.learning_rate("svfit", recipe.LR_FACTOR))
    assert svfit["method_options"] == {} and svfit["steps"] == recipe.STEPS and svfit["snr_gamma"] == recipe.SNR_GAMMA
    paper = recipe.paper_settings("lora")
    assert paper["lr"] == pytest.approx(recipe.learning_rate("lora", 1.0)) and paper["method_options"] == {}
    assert paper["steps"] == recipe.STEPS
    demo = recipe.demo_settings("lora")  # half the tuned steps at twice the tuned rate, the tuned options
    assert demo["steps"] == tuned.steps // 2 and demo["lr"] == pytest.approx(2 * lora["lr"]) and demo["method_options"] == tuned.options
    overridden = dataclasses.replace(tuned, overrides={"snr_gamma": None, "prior": "model"}).train_settings("lora")
    assert overridden["snr_gamma"] is None and overridden["prior"] == "model"
    entry = tuned.entry("lora")
    assert eval("{" + entry + "}", {"Tuned": recipe.Tuned}) == {"lora": tuned}  # an entry pastes back into TUNED


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "learning=1,2"], "unknown --sweep key 'learning'; accepted: lr_factor, steps, a training setting"),
        (["--sweep", "lr_factor=10,abc"], "--sweep lr_factor=abc: must be a finite number"),
        (["--sweep", "lr_factor=0,10"], "--sweep lr_factor=0: must be a positive number"),
        (["--sweep", "batch_size=2.5"], "--sweep batch_size=2.5: must be an integer"),
        (["--sweep", "prior=none,bogus"], "prior 'bogus' is not supported; accepted: images, model, none"),
        (["--sweep", "rank=4,x"], "option 'rank' of method 'lora' must be an integer"),
        (["--sweep", "preset=attention,convs"], "unknown preset 'convs' for method 'lora'"),
        (["--methods", "lora", "oft", "--sweep", "rank=4"], "'rank' is not an option of method(s) oft"),
        (["--sweep", "lr=1e-4"], "--sweep key 'lr' cannot be swept (sweep lr_factor"),
        (["--sweep", "steps="], "--sweep 'steps=' must be KEY=V1,V2,..."),
        (["--sweep", "steps=2", "--sweep", "steps=3"], "--sweep key 'steps' is given twice"),
        (["--sweep", "steps=2", "--tier", "outlines"], "--sweep measures the subject tier"),
        (["--concepts", "red-star"], "unknown concept 'red-star'; accepted: red-striped-star"),
    ],
)
def test_bad_sweep_is_one_line_error(argv, message, tmp_path, capsys):
    base = ["bench", "--quality", "--quality-dir", str(tmp_path), "--markdown", "", "--methods", "lora"]
    code = main(base[:-2] + argv if "--methods" in argv else base + argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())  # nothing trained or written


def test_quality_command_reproduces_the_arguments():
    from personalize.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--quality", "--split", "tuning", "--methods", "lora", "svfit:rank=8", "--sweep", "lr_factor=10,20", "--sweep", "steps=150"]
    args = parser.parse_args(argv + ["--prior", "model", "--captions"])
    command = bench.quality_command(args)
    assert command.startswith("personalize bench --quality ") and "--sweep lr_factor=10,20 --sweep steps=150" in command
    assert vars(parser.parse_args(shlex.split(command)[2:])) == vars(args)


def test_gallery_grid_places_each_column():
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    gallery = {"c": {"instances": [red], "x": [blue] * len(W.UNSEEN_BACKGROUNDS)}}
    grid = gallery_grid(gallery, ["x"])
    assert grid.size == ((1 + len(W.UNSEEN_BACKGROUNDS)) * 64 + 8, 14 + 64)
    assert grid.getpixel((10, 40)) == (255, 0, 0) and grid.getpixel((64 + 4 + 10, 40)) == (0, 0, 255)


def test_instance_captions_name_each_background(tmp_path):
    from personalize.benchmark.quality import write_instances
    from personalize.data import read_captions

    paths = write_instances(W.concept_by_name("pink-heart"), tmp_path)
    captions = read_captions([str(p) for p in paths])
    expected = [f"a {{token}} {{class_noun}} on a {bg} background" for bg in W.INSTANCE_BACKGROUNDS]
    assert [captions[str(p)] for p in paths] == expected


def test_one_background_masks_and_prior_settings(tmp_path):
    """The masks/prior measurement's settings: instance images on one background, each with its object
    mask (read back by the trainer's mask loader), and a run with prior 'model' and no base table."""
    from personalize.benchmark.quality import write_instances
    from personalize.data import load_mask, mask_file

    concept = W.concept_by_name("pink-heart")
    config = QualityConfig(work_dir=str(tmp_path), masks=True, instance_background="black")
    paths = write_instances(concept, tmp_path / "instances", config)
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB")).astype(int)
        mask = np.asarray(load_mask(mask_file(path), Image.open(path).size))
        assert 0.02 < (mask > 127).mean() < 0.9
        assert image[mask == 0].max() < 40  # off the object (edges are antialiased): the black background only
    assert open(paths[0].with_suffix(".txt")).read().strip().endswith("on a black background")

    config = QualityConfig(
        work_dir=str(tmp_path / "run"), methods=["lora"], concepts=["pink-heart"], steps=2, images_per_background=1, sample_steps=2,
        base_images=0, masks=True, instance_background="black", prior="model", mask_background_weight=0.0,
    )  # fmt: skip
    record = run_quality(config, diversity=lambda features: float(len(features)))
    assert record["base_quality"] is None and "Base quality" not in markdown(record) and "| lora |" in markdown(record)
    lora = record["tiers"][W.OUTLINES]["rows"][2]
    assert 0 < lora["first_step_s"] < lora["wall_s"]
    config_json = json.loads((tmp_path / "run" / "runs" / "lora" / "pink-heart" / "config.json").read_text())
    assert config_json["mask_background_weight"] == 0.0 and config_json["prior"] == "model"
