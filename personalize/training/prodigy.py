"""Prodigy (Mishchenko & Defazio 2023, the prodigyopt package) with a learning rate per parameter group.

prodigyopt estimates one step size d for all groups and takes `lr` as its multiplier; groups with
another non-zero lr stop it at the first step ("Setting different lr values in different parameter
groups is only supported for values of 0"). Our runs have such groups: FRoD's off-axis tensors at
1/10 of the main rate, the learned token (token_lr), the text encoders (text_encoder_lr).

`group_scaled(Prodigy)` keeps every group's lr as a multiplier: Prodigy steps with every group at
the largest lr, then each other group's update (weight decay included) is shrunk to its share,

    p <- p_before + (lr_group / lr_max) * (p_after - p_before)

which is what a group lr means for AdamW (the whole update is proportional to it). d is estimated
from the steps actually taken. The optimiser state is Prodigy's own, so checkpoints and resume are
unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


def group_scaled(prodigy: type) -> type:
    """A subclass of `prodigy` (prodigyopt's Prodigy) that accepts a different lr in each group."""

    class GroupScaledProdigy(prodigy):
        """Prodigy with each group's lr a multiplier of its step (module docstring)."""

        def step(self, closure: Any = None) -> Any:
            top = max(group["lr"] for group in self.param_groups)
            scaled = [group for group in self.param_groups if 0 < group["lr"] < top]
            if not scaled:
                return super().step(closure)
            rates = [group["lr"] for group in scaled]
            before = [[p.detach().clone() for p in group["params"]] for group in scaled]
            for group in scaled:
                group["lr"] = top
            try:
                loss = super().step(closure)
            finally:
                for group, rate in zip(scaled, rates):
                    group["lr"] = rate
            with torch.no_grad():
                for group, rate, saved in zip(scaled, rates, before):
                    for param, old in zip(group["params"], saved):
                        param.lerp_(old, 1.0 - rate / top)  # old + (rate / top) * (param - old)
            return loss

    return GroupScaledProdigy
