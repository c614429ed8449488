"""Slots: how an adapter's update is installed on a layer and run in its fastest exact form.

A slot holds one target layer (`nn.Linear` / `nn.Conv2d` owning the frozen `W0`) and its live
update. `DeltaSlot` installs a `LayerAdapter` as the submodule `personalize_adapter` and replaces
the layer's `forward` (an instance attribute, so removing it restores the class's forward); the
layer then computes `W0 + scale * delta` in the form (`forms`) that `forms.choose` measured fastest
on this machine, or that costs the fewest multiply-adds. A method names its slot class (`Method.slot_cls`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import UserError
from .factors import activation_cost, chain_cost, compose, scaled
from .forms import Form, choose

if TYPE_CHECKING:
    from .base import LayerAdapter

ADAPTER_ATTR = "personalize_adapter"  # the submodule name a DeltaSlot installs its adapter under


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's where it is on for x's device, else x's own. Casting
    a method's tensors to it once avoids a float32 copy that autocast would cast back to 16 bits."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Slot:
    """One adapted layer as the core sees it: a frozen base weight plus a live update."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base  # the nn.Linear / nn.Conv2d that owns W0
        self.original_weight: nn.Parameter | None = None  # W0 while merged

    def delta(self) -> torch.Tensor:
        """scale * delta in float32, shaped like W0."""
        raise NotImplementedError

    def rank_bound(self) -> int | None:
        """The largest rank the update can have by the method's form (LoRA's r), or None where the form
        sets no bound below the layer's own. Export writes a bounded update exactly at its rank."""
        return None

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
    (one F.linear / conv) or, where the adapter has a factored form, `layer(x, W0) + x @ (scale * delta)^T`
    through the factors, or x through the whole weight's factors, or a form of the method's own,
    whichever `forms.choose` picks. Slots of methods with other forms (FRoD) override `forms`."""

    def __init__(self, base: nn.Module, adapter: LayerAdapter) -> None:
        super().__init__(base)
        self.adapter = adapter.to(base.weight.device)
        self.live = True
        self.form = ""  # the form the last adapted call ran (forms.py), for reports
        self._signature: str | None = None
        self._factor_meta: tuple[list[torch.Tensor] | None, list[torch.Tensor] | None] | None = None
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
        """The layer's output on `x` with the update at `adapter.scale`, in the form `choose` picks."""
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter.parameters())
        forms = self.forms(x, training)
        self.form = choose(self.form_key(x, training), forms, x, list(self.adapter.parameters()), training)
        return forms[self.form].run(x)

    def form_key(self, x: torch.Tensor, training: bool) -> str:
        """What decides which form is fastest: the layer, the adapter's tensor shapes, the input."""
        if self._signature is None:
            base = self.base
            layer = f"{type(base).__name__}{tuple(base.weight.shape)} {base.weight.dtype}"
            if isinstance(base, nn.Conv2d):
                layer += f" stride {base.stride} padding {base.padding} dilation {base.dilation} groups {base.groups}"
            tensors = ",".join(f"{n}{tuple(t.shape)}" for n, t in [*self.adapter.named_parameters(), *self.adapter.named_buffers()])
            self._signature = f"{type(self.adapter).__name__} on {layer} [{tensors}]"
        return f"{self._signature} x{tuple(x.shape)} {x.dtype} in {compute_dtype(x)} {'training' if training else 'inference'}"

    def forms(self, x: torch.Tensor, training: bool) -> dict[str, Form]:
        """The exact forms of the adapted layer on `x`, with their multiply-add costs:

        - the method's own forms (`LayerAdapter.own_forms`), listed first;
        - "weight": compose `W0 + scale * delta`, one matmul; training adds the composition's backward
          and the weight gradient `G^T X` (tokens x out x fan_in);
        - "activations" (with `delta_factors`): the frozen layer plus `x` through the update's
          factors, as LoRA: tokens x (the factors' sizes), about twice that when training;
        - "full" (with `weight_factors`): `x` through the whole adapted weight's factors alone.
        """
        base, adapter = self.base, self.adapter
        tokens, layer = self.layer_cost(x)
        passes = 2 if training else 1
        factors, full = self._factor_shapes()
        compose_cost = chain_cost(factors) if factors is not None else adapter.compose_cost()
        weight_cost = passes * compose_cost + (3 if training else 1) * layer
        forms = adapter.own_forms(base, x, training)
        forms["weight"] = Form(self._composed_update, weight_cost)
        if factors is not None and self.runs_factors():
            forms["activations"] = Form(
                lambda x: self._run(x, base.weight) + self._run_factors(x, scaled(adapter.delta_factors(), adapter.scale)),
                activation_cost(tokens, factors, training) + passes * layer,
            )
            if full is not None:
                forms["full"] = Form(
                    lambda x: self._add_bias(self._run_factors(x, adapter.weight_factors(adapter.scale))),
                    activation_cost(tokens, full, training),
                )
        return forms

    def _factor_shapes(self) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Meta-device stand-ins (shape, requires_grad) of `delta_factors()` and `weight_factors()`, made
        once: the costs need only shapes, and each form builds its own factors when it runs."""
        if self._factor_meta is None:
            adapter = self.adapter

            def meta(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
                if tensors is None:
                    return None
                return [torch.empty(t.shape, device="meta").requires_grad_(t.requires_grad) for t in tensors]

            with torch.enable_grad():  # whether each factor is trained, even when the first call is a no-grad one
                factors = adapter.delta_factors()
                full = adapter.weight_factors(adapter.scale) if factors is not None and self.runs_factors() else None
            self._factor_meta = (meta(factors), meta(full))
        return self._factor_meta

    def layer_cost(self, x: torch.Tensor) -> tuple[int, int]:
        """(tokens, multiply-adds of the frozen layer) for input `x`: a conv's tokens are its output positions."""
        base = self.base
        if isinstance(base, nn.Conv2d):
            tokens = x.numel() // x.shape[1] // (base.stride[0] * base.stride[1])
        else:
            tokens = x.numel() // x.shape[-1]
        return tokens, tokens * base.weight.numel()

    def runs_factors(self) -> bool:
        """Whether `_run_factors` can run this layer (a plain conv or a linear)."""
        base = self.base
        return not isinstance(base, nn.Conv2d) or (base.groups == 1 and base.padding_mode == "zeros")

    def _composed_update(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapter
        factors = adapter.delta_factors()
        with torch.autocast(device_type=self.base.weight.device.type, enabled=False):  # compose in float32
            delta = adapter.delta_weight() if factors is None else compose(factors).view(self.base.weight.shape)
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

    def delta(self) -> torch.Tensor:
        return self.adapter.delta_weight() * self.adapter.scale

    def rank_bound(self) -> int | None:
        """A factored update's rank is at most the smallest size in its factor chain (LoLDU's r, AOFT's d)."""
        factors = self.adapter.delta_factors()
        return None if factors is None else min(size for factor in factors for size in factor.shape)

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
