"""`personalize bench --quality` end to end on a minimal budget: one method, one concept, two steps.

Checks the record's rows, the markdown tables and that every grid column holds images (the base
model's included); the numbers themselves are measured by the full run (BENCHMARKS.md)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from personalize.benchmark.quality import BASE, INSTANCES, QualityConfig, gallery_grid, markdown, run_quality
from personalize.shapes import world as W


def test_minimal_quality_run(tmp_path):
    config = QualityConfig(
        work_dir=str(tmp_path),
        methods=["lora", "lora:preset=attention_convs"],
        concepts=["pink-heart"],
        steps=2,
        images_per_background=1,
        sample_steps=2,
        base_images=2,
    )
    record = run_quality(config, diversity=lambda features: float(len(features)))
    assert [row["label"] for row in record["rows"]] == [INSTANCES, BASE, "lora", "lora:preset=attention_convs"]
    lora, convs = record["rows"][2:]
    assert lora["trainable"] > 0 and lora["file_bytes"] > 0 and lora["scores"]["images"] == len(W.UNSEEN_BACKGROUNDS)
    assert convs["trainable"] > lora["trainable"]  # the same method with the convs as well: its options reached training

    def used_options(run: str) -> dict:
        return json.loads((tmp_path / "runs" / run / "pink-heart" / "config.json").read_text())["method_options"]

    assert used_options("lora")["preset"] == "attention" and used_options("lora-preset-attention_convs")["preset"] == "attention_convs"
    assert np.isnan(record["rows"][0]["scores"]["alignment"])  # the instance images are not prompted
    assert set(record["base_quality"]["per_attribute"]) == {"shape", "colour", "pattern", "background"}
    text = markdown(record)
    assert "| lora |" in text and "| base model (no adapter) |" in text

    grid = np.asarray(Image.open(record["grid"]).convert("L"))
    cell, header = 64, 14
    n_inst, n_bg = 4, len(W.UNSEEN_BACKGROUNDS)
    for column in range(2):  # base, then lora: each block starts after the instances and a 4 px gap
        left = (n_inst * cell + 4) + column * (n_bg * cell + 4)
        block = grid[header:, left : left + n_bg * cell]
        assert (block < 250).mean() > 0.5, f"grid column {column} is blank"


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
    lora = record["rows"][2]
    assert 0 < lora["first_step_s"] < lora["wall_s"]
    config_json = json.loads((tmp_path / "run" / "runs" / "lora" / "pink-heart" / "config.json").read_text())
    assert config_json["mask_background_weight"] == 0.0 and config_json["prior"] == "model"
