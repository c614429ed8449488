"""Training on unusual input: a non-finite loss, many photos, non-square photos on SDXL, Min-SNR with
prior preservation (weights on the instance loss only, as diffusers)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personalize.data import MANY_IMAGES
from personalize.errors import UserError
from personalize.train import TrainCallback, TrainConfig, train
from personalize.training.objective import dreambooth_loss, evaluation_images
from personalize.training.trainer import Trainer

from .conftest import make_photos
from .test_train_options import save_tiny_pipeline


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(fast, monkeypatch):
    original, calls = Trainer.loss, []

    def failing(self, batch):
        calls.append(1)
        loss = original(self, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(Trainer, "loss", failing)
    with pytest.raises(
        UserError,
        match=r"training stopped at step 3: the loss is nan .*no adapter was saved; "
        r"the last good checkpoint is .*step_000002",
    ):
        train(TrainConfig(**{**fast, "checkpoint_every": 2}))
    out = Path(fast["output_dir"])
    assert not (out / "adapter.safetensors").exists()
    kept = load_file(out / "checkpoints" / "step_000002" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values() if t.is_floating_point())


def test_min_snr_weights_the_instance_loss_only():
    errors = torch.tensor([1.0, 3.0, 2.0, 4.0])  # two instance rows, then two class rows
    weights = torch.tensor([0.5, 0.5, 0.1, 0.1])
    assert dreambooth_loss(errors, weights, 2, 0.5).item() == pytest.approx(0.5 * 2.0 + 0.5 * 3.0)
    assert dreambooth_loss(errors[:2], weights[:2], 2, 0.5).item() == pytest.approx(1.0)
    assert dreambooth_loss(errors, None, 2, 1.0).item() == pytest.approx(2.0 + 3.0)


def test_evaluation_set_is_capped_and_evenly_spaced():
    assert evaluation_images(5, 16).tolist() == [0, 1, 2, 3, 4]
    picked = evaluation_images(500, 16)
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 499 and len(set(picked.tolist())) == 16


class Stages(TrainCallback):
    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, int]] = {}

    def on_prepare(self, stage: str, done: int, total: int) -> None:
        self.seen[stage] = (done, total)


def test_many_photos_warn_cap_the_evaluation_and_report_progress(fast, tmp_path, caplog):
    half = (MANY_IMAGES + 2) // 2
    photos = [str(p) for part in ("a", "b") for p in make_photos(tmp_path / part, count=half, size=(72, 64))]
    stages = Stages()
    with caplog.at_level(logging.WARNING, logger="personalize"):
        result = train(
            TrainConfig(**{**fast, "instance_images": photos, "steps": 1, "eval_images": 3, "eval_timesteps": 2}), callbacks=[stages]
        )
    assert result.steps_done == 1
    assert any(f"{MANY_IMAGES + 2} instance images" in r.getMessage() for r in caplog.records)
    assert stages.seen["encoding images"] == (MANY_IMAGES + 2, MANY_IMAGES + 2)
    assert stages.seen["evaluation before training"] == (6, 6)  # 3 images x 2 timesteps, not 22 x 2
    assert stages.seen["evaluation after training"] == (6, 6)


def test_sdxl_conditions_on_each_photos_size_and_crop(fast, tmp_path, monkeypatch):
    base = save_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    photos = tmp_path / "wide"
    make_photos(photos, count=1, size=(96, 80))  # (width, height)
    original, seen = Trainer.loss, []

    def spy(self, batch):
        seen.append(batch.conditioning.time_ids.tolist())
        return original(self, batch)

    monkeypatch.setattr(Trainer, "loss", spy)
    train(TrainConfig(**{**fast, "base_model": base, "instance_images": str(photos), "steps": 1, "resolution": 64, "method": "svfit"}))
    # 96x80 -> shorter side 64: 77x64, centre crop from left 6: original (h, w), crop (top, left), target (h, w)
    assert seen[0] == [[80.0, 96.0, 0.0, 6.0, 64.0, 64.0]]
    assert math.isfinite(sum(seen[0][0]))
