"""Prodigy (`optimizer = "prodigy"`, the prodigyopt package): lr defaults to 1.0, it trains, a resumed
run reproduces the uninterrupted one (its step-size estimate is optimiser state), and without the
package the error is one line naming it."""

from __future__ import annotations

import json
import logging
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from personalize.cli import main
from personalize.train import TrainConfig, train
from tests.test_training.test_train_resume import assert_same_run, resumed_run, step_losses

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


def test_group_rates_scale_each_groups_step():
    """One Prodigy step with groups at lr 1 and 0.1: the first moves as in Prodigy with both groups at 1, the
    second a tenth as far (AdamW's meaning of a group lr); the stock Prodigy refuses such groups."""
    from prodigyopt import Prodigy

    from personalize.training.prodigy import group_scaled

    def one_step(cls, rates):
        params = [torch.nn.Parameter(torch.zeros(8)) for _ in rates]  # at 0: float32 resolves steps of d0 = 1e-6
        start = [p.detach().clone() for p in params]
        optimizer = cls([{"params": [p], "lr": rate} for p, rate in zip(params, rates)], weight_decay=1e-2, use_bias_correction=True)
        sum((p * torch.arange(1.0, 9.0)).sum() for p in params).backward()
        optimizer.step()
        return [p.detach() - s for p, s in zip(params, start)]

    equal = one_step(Prodigy, [1.0, 1.0])
    scaled = one_step(group_scaled(Prodigy), [1.0, 0.1])
    assert equal[0].abs().min() > 0 and torch.equal(scaled[0], equal[0])
    assert torch.allclose(scaled[1], 0.1 * equal[1], rtol=1e-5, atol=1e-9)
    with pytest.raises(RuntimeError, match="different lr values"):
        one_step(Prodigy, [1.0, 0.1])


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "frod"},  # its off-axis group at 1/10 of lr
        {"token_vectors": 1, "token_lr": 0.5},
        {"train_text_encoder": True, "text_encoder_lr": 0.5},
    ],
    ids=["frod", "token", "text_encoder"],
)
def test_prodigy_trains_unequal_group_rates_and_resumes_exactly(fast, tmp_path, changes):
    settings = {**fast, "method": "lora", "optimizer": "prodigy", "lr": None, "steps": 4, "checkpoint_every": 2, **changes}
    full = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "full")}))
    assert full.steps_done == 4 and all(math.isfinite(loss) for loss in step_losses(tmp_path / "full").values())
    assert_same_run(resumed_run(settings, tmp_path / "part"), full)


def test_prodigy_names_text_side_rates_far_below_lr(fast, caplog):
    from personalize.training.trainer import Trainer

    with caplog.at_level(logging.WARNING):
        Trainer(TrainConfig(**{**fast, "optimizer": "prodigy", "lr": None, "token_vectors": 1}), [], None)
    assert "optimizer prodigy: token_lr 0.0005 is a multiplier of Prodigy's step size, as lr (1) is" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer(TrainConfig(**{**fast, "optimizer": "prodigy", "lr": None, "token_vectors": 1, "token_lr": 1.0}), [], None)
    assert "optimizer prodigy" not in caplog.text
