"""Exponential moving average (EMA) of an adapter's trainable tensors (`ema_decay > 0`).

After every optimiser step that was taken (not one skipped by an fp16 overflow) each trainable
tensor's shadow moves toward its live value:

    shadow <- d_t * shadow + (1 - d_t) * param
    d_t     = 0                                    for the first update (t = 0): shadow = param
    d_t     = min(decay, (1 + t) / (10 + t))       after it

where t is the number of updates done before this one. This is the warm-up diffusers' `EMAModel`
uses by default (diffusers 0.42 `training_utils.EMAModel.get_decay` with `use_ema_warmup=False`,
`update_after_step=0`, `min_decay=0`), so early shadows are not dominated by the initial weights:
d_t reaches 0.9 at the 81st update and 0.999 at the 8991st. The update is `torch.lerp(shadow, param, 1 - d_t)`,
which is exactly `param` at d_t = 0.

Stored: one float32 shadow per trainable tensor (keyed by the adapter's tensor names, on the tensor's
device) and the number of updates. `applied()` copies the shadows into the live tensors for a block
(validation samples, evaluation, saving the averaged adapter) and copies the training values back
after, bit for bit; `state_dict` / `load_state_dict` carry both through checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import UserError

WARMUP_OFFSET = 10  # diffusers' warm-up (1 + t) / (10 + t)


def decay_at(decay: float, updates: int) -> float:
    """The factor of update number `updates + 1` (diffusers `EMAModel.get_decay(updates + 1)`)."""
    if updates <= 0:
        return 0.0
    return min(decay, (1 + updates) / (WARMUP_OFFSET + updates))


class AdapterEMA:
    """Float32 shadows of named trainable tensors (the live parameters are held by reference)."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        if not 0 < decay < 1:
            raise UserError(f"ema_decay must lie in (0, 1) for an average, got {decay}")
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}  # each shaped like its param

    @classmethod
    def of(cls, adapter, decay: float) -> AdapterEMA:
        """The EMA of an `inject.Adapter`'s trainable tensors, starting at their current values."""
        return cls({name: param for name, param, _ in adapter.named_trainables()}, decay)

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow toward its live tensor; call once per optimiser step taken."""
        weight = 1.0 - decay_at(self.decay, self.updates)
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), weight)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the live tensors hold the averages; the training values are restored after."""
        with torch.no_grad():
            saved = {name: p.detach().clone() for name, p in self.params.items()}  # same dtype: exact copies
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": dict(self.shadow), "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise UserError(f"the EMA state does not fit this adapter (missing: {missing[:3]}, unexpected: {extra[:3]})")
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise UserError(f"the EMA state of '{name}' has shape {list(tensor.shape)}, the adapter {list(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.updates = int(state["updates"])
