"""peft layers seen through the core's Slot interface, shared by every peft-backed method.

peft owns the layers (it swaps each target for a wrapper whose `base_layer` is the original
module); the core still merges by swapping weights, so unmerge and detach restore W0 bit-exactly.
Two kinds of update:

- additive (LoRA, LoHa, LoKr): `W = W0 + delta`, `delta = get_delta_weight(...)`; the strength is
  peft's own scaling (`set_scale`: `scaling = scale * alpha / r`), linear in the update.
- non-additive (DoRA: `m * (W0 + BA) / ||W0 + BA||`; OFT: `W0 R^T` with a block-diagonal rotation
  R): peft has no linear strength for these (OFT ignores `set_scale`; DoRA's magnitude keeps acting
  at scale 0). The slot defines the strength as the interpolation
  `W(s) = W0 + s * (W_peft - W0)`: the additive delta is `W_peft - W0`, with `W_peft` computed by
  peft's own merge on a float32 scratch copy of W0, and the live output is
  `base(x) + s * (peft(x) - base(x))` (exact, since a layer is linear in its weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .base import AdapterConfig, Method
from .slots import Slot

PEFT_NAME = "default"  # the adapter name peft stores each layer's tensors under


class PeftSlot(Slot):
    """One peft layer (`layer.base_layer` is the original Linear/Conv2d) installed at `name` in `root`."""

    def __init__(self, root: nn.Module, name: str, layer: nn.Module, additive: bool) -> None:
        super().__init__(layer.base_layer)
        self.root, self.name, self.layer, self.additive = root, name, layer, additive
        self.scale = 1.0
        if not additive:
            layer.forward = self._interpolated_forward  # instance attribute; peft's class forward stays

    # --- the update ---------------------------------------------------------------------------
    def delta(self) -> torch.Tensor:
        if self.additive:
            return self.layer.get_delta_weight(PEFT_NAME).float()  # includes scaling = scale * alpha / r
        return (self.merged_weight() - self.base_weight().float()) * self.scale

    def rank_bound(self) -> int | None:
        """LoRA's `B A` has rank at most r; LoHa's Hadamard product of two rank-r products at most r^2.
        The non-additive updates (DoRA, OFT) and LoKr's Kronecker product: no bound taken."""
        layer = self.layer
        if not self.additive:
            return None
        if PEFT_NAME in getattr(layer, "lora_A", {}):
            return layer.r[PEFT_NAME]
        if PEFT_NAME in getattr(layer, "hada_w1_a", {}):
            return layer.r[PEFT_NAME] ** 2
        return None

    def base_weight(self) -> torch.Tensor:
        """W0, also while the core has the merged weight in place."""
        return self.base.weight if self.original_weight is None else self.original_weight

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """peft's merged weight at full strength, in float32, computed on a scratch copy of W0."""
        base, layer = self.base, self.layer
        current = base.weight
        scratch = nn.Parameter(self.base_weight().detach().float().clone(), requires_grad=False)
        try:
            base.weight = scratch
            layer.merge(adapter_names=[PEFT_NAME])
            return base.weight.detach().clone()
        finally:
            base.weight = current
            layer.merged_adapters.clear()
            getattr(layer, "_caches", {}).clear()  # DoRA caches the weight norm for its own unmerge

    def _interpolated_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        if layer.disable_adapters or self.scale == 1.0:
            return type(layer).forward(layer, x, *args, **kwargs)
        base_out = layer.base_layer(x, *args, **kwargs)
        if self.scale == 0.0:
            return base_out
        return torch.lerp(base_out, type(layer).forward(layer, x, *args, **kwargs), self.scale)

    def set_scale(self, scale: float) -> None:
        self.scale = scale
        if self.additive:
            self.layer.set_scale(PEFT_NAME, scale)

    def set_live(self, live: bool) -> None:
        self.layer._disable_adapters = not live

    # --- tensors ------------------------------------------------------------------------------
    def named_trainables(self) -> list[tuple[str, nn.Parameter, str]]:
        """peft's adapter parameters, named without the adapter name and a trailing `.weight`
        (`lora_A.default.weight` -> `lora_A`, `hada_w1_a.default` -> `hada_w1_a`): file keys have no dots."""
        named = []
        for full, param in self.layer.named_parameters():
            parts = full.split(".")
            if parts[0] == "base_layer":
                continue
            named.append(("_".join(p for p in parts if p not in (PEFT_NAME, "weight")), param, "main"))
        assert len({n for n, _, _ in named}) == len(named), f"tensor names collide in {type(self.layer).__name__}"
        return named

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p, _ in self.named_trainables()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param, _ in self.named_trainables():
                param.copy_(tensors[name])

    # --- installation -------------------------------------------------------------------------
    def _set_child(self, module: nn.Module) -> None:
        parent_name, _, child = self.name.rpartition(".")
        parent = self.root.get_submodule(parent_name) if parent_name else self.root
        setattr(parent, child, module)

    def remove(self) -> None:
        self._set_child(self.base)
        if not any(hasattr(m, "base_layer") for m in self.root.modules()) and hasattr(self.root, "peft_config"):
            del self.root.peft_config  # peft's marker; left behind it makes a later attach warn

    def install(self) -> None:
        if hasattr(self.root.get_submodule(self.name), "base_layer"):
            raise UserError("layer already has an adapter attached; detach it first")
        self._set_child(self.layer)


class PeftMethod(Method):
    """A method whose layers peft builds from a peft config; subclasses give the config."""

    additive: bool = True  # False: the slot interpolates between W0 and peft's merged weight

    @classmethod
    def peft_config(cls, config: AdapterConfig, targets: list[str]) -> Any:
        """The peft config (LoraConfig, LoHaConfig, ...) for `targets` (full module names)."""
        raise NotImplementedError

    @classmethod
    def attach_layers(cls, layers, config, saved=None, root=None):
        from peft import inject_adapter_in_model  # imported here: peft is slow to import

        inject_adapter_in_model(cls.peft_config(config, list(layers)), root, adapter_name=PEFT_NAME)
        slots = {name: PeftSlot(root, name, root.get_submodule(name), cls.additive) for name in layers}
        for slot in slots.values():
            slot.layer.to(slot.base.weight.device)
        return slots
