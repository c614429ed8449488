"""EMA of the adapter's trainable tensors (`ema_decay > 0`): the update rule and its warm-up, exact
restoring of the training weights, the saved adapter holding the averages, checkpoints holding both,
no change with the EMA off, and an exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from personalize.errors import UserError
from personalize.inject import load_adapter
from personalize.io import read_adapter_file
from personalize.models import tiny_unet
from personalize.train import TrainConfig, train
from personalize.training.ema import AdapterEMA, decay_at
from personalize.training.trainer import Trainer
from tests.test_training.test_train_resume import assert_same_run, resumed_run, step_losses

DECAY = 0.9


def record_live_weights(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The adapter's trainable tensors after each optimiser step of the next runs."""
    seen: list[dict[str, torch.Tensor]] = []
    original = Trainer.optimiser_step

    def spy(self, step: int) -> float:
        loss = original(self, step)
        seen.append({name: p.detach().clone() for name, p, _ in self.adapter.named_trainables()})
        return loss

    monkeypatch.setattr(Trainer, "optimiser_step", spy)
    return seen


def ema_by_hand(history: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """diffusers' EMAModel: factor 0 for the first update, then min(decay, (1 + t) / (10 + t))."""
    shadow: dict[str, torch.Tensor] = {}
    for t, live in enumerate(history):
        d = 0.0 if t == 0 else min(decay, (1 + t) / (10 + t))
        shadow = {k: d * shadow[k] + (1 - d) * v if shadow else v for k, v in live.items()}
    return shadow


def test_update_rule_with_warmup():
    param = nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = AdapterEMA({"w": param}, decay=0.5)
    assert torch.equal(ema.shadow["w"], torch.tensor([1.0, 2.0])) and ema.updates == 0
    for value, expected in [([3.0, 4.0], [3.0, 4.0]), ([14.0, 15.0], [12.0, 13.0]), ([0.0, 1.0], [3.0, 4.0])]:
        param.data = torch.tensor(value)
        ema.update()
        assert torch.allclose(ema.shadow["w"], torch.tensor(expected), atol=1e-6)
    # d = 0 (copy), 2/11 (warm-up), 3/12 (warm-up) as above; the warm-up reaches the cap at t = 8
    assert ema.updates == 3 and decay_at(0.5, 0) == 0.0 and decay_at(0.5, 1) == pytest.approx(2 / 11)
    assert decay_at(0.5, 8) == 0.5 and decay_at(0.5, 1000) == 0.5 and decay_at(0.999, 80) == pytest.approx(0.9)


def test_applied_restores_exactly_and_state_round_trips():
    torch.manual_seed(0)
    params = {"a": nn.Parameter(torch.randn(3, 4)), "b": nn.Parameter(torch.randn(5))}
    ema = AdapterEMA(params, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update()
    live = {k: p.detach().clone() for k, p in params.items()}
    with ema.applied():
        assert all(torch.equal(params[k], ema.shadow[k]) for k in params)
    assert all(torch.equal(params[k], live[k]) and params[k].requires_grad for k in params)  # bit for bit

    other = AdapterEMA({k: nn.Parameter(torch.zeros_like(p)) for k, p in params.items()}, decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and all(torch.equal(other.shadow[k], ema.shadow[k]) for k in params)
    with pytest.raises(UserError, match="does not fit"):
        AdapterEMA({"a": params["a"]}, 0.99).load_state_dict(ema.state_dict())


def test_saved_adapter_holds_the_average_and_checkpoints_both(fast, tmp_path, monkeypatch):
    seen = record_live_weights(monkeypatch)
    settings = {**fast, "method": "lora", "steps": 4, "checkpoint_every": 2}
    on = train(TrainConfig(**{**settings, "ema_decay": DECAY, "output_dir": str(tmp_path / "on")}))
    history, seen[:] = list(seen), []
    off = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "off")}))

    # the EMA never touches training: same losses and live weights as without it
    assert step_losses(tmp_path / "on") == step_losses(tmp_path / "off")
    assert all(torch.equal(history[-1][k], seen[-1][k]) for k in seen[-1])
    plain = load_file(off.adapter_path)
    assert all(torch.equal(plain[k], v) for k, v in seen[-1].items())
    assert not any(p.name.startswith(("ema", "adapter_ema")) for p in (tmp_path / "off").rglob("*"))  # no EMA files

    saved, expected = load_file(on.adapter_path), ema_by_hand(history, DECAY)
    assert all((saved[k] - v).abs().max() <= 1e-6 for k, v in expected.items())
    assert any(not torch.equal(saved[k], history[-1][k]) for k in expected)  # the average, not the live weights
    assert read_adapter_file(on.adapter_path).metadata["train_config"]["ema_decay"] == DECAY

    step2 = tmp_path / "on" / "checkpoints" / "step_000002"
    live2, ema2 = load_file(step2 / "adapter.safetensors"), ema_by_hand(history[:2], DECAY)
    assert all(torch.equal(live2[k], v) for k, v in history[1].items())  # resume loads the training weights
    with safe_open(step2 / "ema.safetensors", "pt") as f:
        assert f.metadata()["updates"] == "2" and all((f.get_tensor(k) - v).abs().max() <= 1e-6 for k, v in ema2.items())
    averaged = load_adapter(tiny_unet("sd1"), step2 / "adapter_ema.safetensors")
    assert {n for n, _, _ in averaged.named_trainables()} == set(ema2)
    assert all((p.detach() - ema2[n]).abs().max() <= 1e-6 for n, p, _ in averaged.named_trainables())
    final = load_file(tmp_path / "on" / "checkpoints" / "step_000004" / "adapter_ema.safetensors")
    assert all(torch.equal(final[k], saved[k]) for k in expected)


def test_resume_with_ema_is_exact(fast, tmp_path):
    settings = {**fast, "method": "lora", "steps": 4, "checkpoint_every": 2, "ema_decay": DECAY}
    full = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "full")}))
    resumed = resumed_run(settings, tmp_path / "part")  # resume from step 2: the EMA state must come back exactly
    assert resumed.resumed_from == 2 and resumed.eval_loss_end == full.eval_loss_end
    assert_same_run(resumed, full)


def test_resume_without_ema_state_is_one_line(fast, tmp_path):
    settings = {**fast, "method": "lora", "steps": 2, "checkpoint_every": 1, "ema_decay": DECAY}
    train(TrainConfig(**settings))
    for checkpoint in (tmp_path / "run" / "checkpoints").iterdir():
        (checkpoint / "ema.safetensors").unlink()
    with pytest.raises(UserError, match=r"step_000002 has no ema\.safetensors .*, and no earlier checkpoint reads in full") as info:
        train(TrainConfig(**{**settings, "steps": 3, "resume": True}))
    assert "\n" not in str(info.value)
