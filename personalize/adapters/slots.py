"""Slots: how an adapter's update is installed on a layer and run in its cheapest exact form.

A slot holds one target layer (`nn.Linear` / `nn.Conv2d` owning the frozen `W0`) and its live
update. `DeltaSlot` installs a `LayerAdapter` as the submodule `personalize_adapter` and replaces
the layer's `forward` (an instance attribute, so removing it restores the class's forward); the
layer then computes `W0 + scale * delta` in whichever form `cheapest` finds to cost the fewest
multiply-adds. A method names its slot class (`Method.slot_cls`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import UserError
from .factors import activation_cost, chain_cost, compose, scaled

if TYPE_CHECKING:
    from .base import LayerAdapter

ADAPTER_ATTR = "personalize_adapter"  # the submodule name a DeltaSlot installs its adapter under


def cheapest(costs: dict[str, int]) -> str:
    """The one planner: the form with the fewest multiply-adds (on a tie, the first listed)."""
    return min(costs, key=costs.__getitem__)


class Slot:
    """One adapted layer as the core sees it: a frozen base weight plus a live update."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base  # the nn.Linear / nn.Conv2d that owns W0
        self.original_weight: nn.Parameter | None = None  # W0 while merged

    def delta(self) -> torch.Tensor:
        """scale * delta in float32, shaped like W0."""
        raise NotImplementedError

    def set_scale(self, scale: float) -> None:
        raise NotImplementedError

    def set_live(self, live: bool) -> None:
        """Switch the live (unmerged) update branch on or off."""
        raise NotImplementedError

    def named_trainables(self) -> list[tuple[str, nn.Parameter, str]]:
        """(tensor name, parameter, learning-rate group) of the trainable tensors."""
        raise NotImplementedError

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the adapter file stores for this layer."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        """Uninstall the live update branch (the base weight is left as it is)."""
        raise NotImplementedError

    def install(self) -> None:
        """Put the live update branch back after `remove()`, with the same adapter tensors (the
        benchmark swaps methods on one model this way instead of decomposing again)."""
        raise NotImplementedError


class DeltaSlot(Slot):
    """Installs a LayerAdapter on its layer. The forward runs the layer with `W0 + scale * delta`
    (one F.linear / conv) or, when the adapter has a factored form and that costs less (`plan`),
    `layer(x, W0) + x @ (scale * delta)^T` through the factors, or x through the whole weight's factors.
    Slots of methods with their own forms (FRoD) override `_adapted` and pick with `cheapest` too."""

    def __init__(self, base: nn.Module, adapter: LayerAdapter) -> None:
        super().__init__(base)
        self.adapter = adapter.to(base.weight.device)
        self.live = True
        self.install()

    def install(self) -> None:
        if hasattr(self.base, ADAPTER_ATTR):
            raise UserError("layer already has an adapter attached; detach it first")
        self.base.add_module(ADAPTER_ATTR, self.adapter)
        self.base.forward = self._forward  # instance attribute; `del` restores the class's forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.live or self.adapter.scale == 0.0:
            return self._run(x, self.base.weight)
        return self._adapted(x)

    def _adapted(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output on `x` with the update at `adapter.scale`, in the cheapest exact form."""
        base, adapter = self.base, self.adapter
        own = adapter.own_forward(base, x)
        if own is not None:
            return own
        factors = adapter.delta_factors()
        if factors is not None:
            full = adapter.weight_factors(adapter.scale)
            path = self.plan(x, factors, full)
            if path == "full":
                assert full is not None
                return self._add_bias(self._run_factors(x, full))
            if path == "activations":
                return self._run(x, base.weight) + self._run_factors(x, scaled(factors, adapter.scale))
        with torch.autocast(device_type=base.weight.device.type, enabled=False):  # compose in float32
            delta = adapter.delta_weight() if factors is None else compose(factors).view(base.weight.shape)
        return self._composed(x, delta)

    def _composed(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The layer run once with the composed weight `W0 + scale * delta` (`delta` float32, W0's shape)."""
        weight = self.base.weight
        return self._run(x, torch.add(weight, delta.to(weight.dtype), alpha=self.adapter.scale))

    def _run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, weight, base.bias)
        return nn.functional.linear(x, weight, base.bias)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        bias = self.base.bias
        if bias is None:
            return y
        return y + bias.to(y.dtype).view(-1, 1, 1) if isinstance(self.base, nn.Conv2d) else y + bias.to(y.dtype)

    def _run_factors(self, x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
        """`x` through a factor chain, right to left, without forming the matrix."""
        base = self.base
        conv = isinstance(base, nn.Conv2d)
        h, first = x, True
        for factor in reversed(factors):
            factor = factor.to(h.dtype)  # a no-op under autocast's fp32 inputs; fp16 for half inputs
            if factor.dim() == 1:
                h = h * (factor.view(-1, 1, 1) if conv else factor)
            elif conv and first:  # the kernel's taps: (r, in*k*k) -> (r, in, k, k), the layer's geometry
                kernel = factor.view(factor.shape[0], -1, *base.kernel_size)
                h = nn.functional.conv2d(h, kernel, None, base.stride, base.padding, base.dilation)
                first = False
            elif conv:
                h = nn.functional.conv2d(h, factor[:, :, None, None])  # channel mixing: a 1x1 conv
            else:
                h = nn.functional.linear(h, factor)
                first = False
        return h

    def prefers_activations(self, x: torch.Tensor, factors: list[torch.Tensor]) -> bool:
        """True when applying the update's factors to `x` costs less than composing the update."""
        return self.plan(x, factors, None) == "activations"

    def plan(self, x: torch.Tensor, factors: list[torch.Tensor], full: list[torch.Tensor] | None) -> str:
        """The cheapest way to run the layer on `x`, in multiply-adds: "weight" (compose W0 + delta,
        one matmul), "activations" (the frozen layer plus x through the update's factors, as LoRA)
        or "full" (x through `weight_factors` alone).

        Composing costs the chain's matmuls and, when training, the weight gradient `G^T X` (tokens x
        out x fan_in) plus the chain's backward; the factor forms cost tokens x (the factors' sizes),
        about twice that when training. LoRA-sized ranks always take the activation forms; full-rank
        factors take them where the layer sees fewer tokens than about its width.
        """
        base = self.base
        if isinstance(base, nn.Conv2d):
            if base.groups != 1 or base.padding_mode != "zeros":
                return "weight"
            tokens = x.numel() // x.shape[1] // (base.stride[0] * base.stride[1])
        else:
            tokens = x.numel() // x.shape[-1]
        matrices = [f for f in factors if f.dim() == 2]
        out, fan_in = matrices[0].shape[0], matrices[-1].shape[1]
        training = torch.is_grad_enabled() and any(f.requires_grad for f in factors)
        layer = tokens * out * fan_in  # the frozen layer's matmul
        costs = {
            "weight": (2 * chain_cost(factors) + 3 * layer) if training else chain_cost(factors) + layer,
            "activations": activation_cost(tokens, factors, training) + (2 if training else 1) * layer,
        }
        if full is not None:
            costs["full"] = activation_cost(tokens, full, training)
        return cheapest(costs)

    def delta(self) -> torch.Tensor:
        return self.adapter.delta_weight() * self.adapter.scale

    def set_scale(self, scale: float) -> None:
        self.adapter.scale = scale

    def set_live(self, live: bool) -> None:
        self.live = live

    def named_trainables(self) -> list[tuple[str, nn.Parameter, str]]:
        return [(n, p, self.adapter.param_group(n)) for n, p in self.adapter.named_parameters()]

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {n: p.detach() for n, p, _ in self.named_trainables()}
        tensors.update({n: getattr(self.adapter, n) for n in self.adapter.saved_buffers})
        return tensors

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.adapter.named_parameters():
                param.copy_(tensors[name])

    def remove(self) -> None:
        del self.base.forward
        delattr(self.base, ADAPTER_ATTR)
