"""Prodigy (`optimizer = "prodigy"`, the prodigyopt package): lr defaults to 1.0, it trains, a resumed
run reproduces the uninterrupted one (its step-size estimate is optimiser state), and without the
package the error is one line naming it."""

from __future__ import annotations

import json
import sys

import pytest
from safetensors.torch import load_file

from personalize.cli import main
from personalize.train import TrainConfig, train
from tests.test_training.test_train_resume import assert_same_run, resumed_run

pytest.importorskip("prodigyopt")


def test_prodigy_trains_and_resumes_exactly(fast, tmp_path):
    settings = {**fast, "method": "lora", "optimizer": "prodigy", "lr": None, "steps": 4, "checkpoint_every": 2}
    full = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "full")}))
    assert json.loads((tmp_path / "full" / "config.json").read_text())["lr"] == 1.0  # Prodigy's multiplier
    trained = load_file(full.adapter_path)
    assert any(t.abs().sum() > 0 for n, t in trained.items() if "lora_B" in n)  # B starts at zero: it moved

    assert_same_run(resumed_run(settings, tmp_path / "part"), full)


def test_missing_prodigyopt_is_one_line(fast, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    code = main(
        ["train", "--instance-images", fast["instance_images"], "--output-dir", fast["output_dir"], "--base-model", "tiny"]
        + ["--optimizer", "prodigy"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install prodigyopt" in err
