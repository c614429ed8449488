"""Every registered method trains on the tiny model: 30 steps lower the fixed-set evaluation loss, and
the run's files (adapter with its config, result.json, log.jsonl) are complete and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import personalize as P
from personalize.models import tiny_unet
from personalize.train import TrainConfig, train

# The paper learning rates are tuned for 500-1000 steps on SD 1.5; a 30-step run on a random tiny
# model needs a larger step size to move measurably, so the test trains at 10x each method's default.
LR_FACTOR_30_STEPS = 10.0


@pytest.mark.parametrize("method", P.METHODS)
def test_thirty_steps_lower_the_eval_loss(method, fast):
    lr = LR_FACTOR_30_STEPS * P.get_method(method).train_defaults.lr
    # at 32 px (the smallest resolution, 16x16 latents): every layer trains, at a quarter of 64 px's attention tokens
    result = train(TrainConfig(**{**fast, "method": method, "steps": 30, "lr": lr, "eval_timesteps": 4, "resolution": 32}))
    assert result.steps_done == 30 and not result.cancelled
    assert result.eval_loss_end < result.eval_loss_start, (result.eval_loss_start, result.eval_loss_end)

    out = Path(result.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "checkpoints", "config.json", "log.jsonl", "result.json"]
    saved = json.loads((out / "result.json").read_text())
    assert saved["eval_loss_start"] == result.eval_loss_start and saved["eval_loss_end"] == result.eval_loss_end
    assert saved["num_trainable"] == result.num_trainable > 0
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == lr and config["steps"] == 30 and config["resolution"] == 32 and config["method"] == method
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31)) and all(r["lr"] == pytest.approx(lr) for r in steps)

    # the adapter file carries the effective config and loads onto a fresh model with a non-zero update
    info = P.adapter_info(result.adapter_path)
    assert info["method"] == method and info["metadata"]["train_config"] == config
    assert info["metadata"]["token"] == "sks" and info["num_trainable"] == result.num_trainable
    adapter = P.load_adapter(tiny_unet("sd1"), result.adapter_path)
    assert adapter.num_trainable == result.num_trainable
    assert max(d.abs().max().item() for d in adapter.deltas().values()) > 0
    assert all(torch.isfinite(d).all() for d in adapter.deltas().values())
