"""Attach adapters to a model: find target layers, then merge, unmerge, scale and detach them.

`attach(unet, "svfit")` returns an `Adapter` handle over one slot per target layer. Every method
shares this plumbing: merge swaps in `W0 + scale * delta` and keeps W0 aside, so unmerge and
detach restore W0 bit-exactly.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import torch
from torch import nn

from .adapters.base import ADAPTER_ATTR, AdapterConfig, Method, Slot, get_method
from .errors import UserError


def find_targets(root: nn.Module, pattern: str, method: type[Method]) -> dict[str, nn.Module]:
    """Modules whose name matches `pattern` (re.search) and whose type the method supports."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"target pattern '{pattern}' is not a valid regular expression: {exc}") from exc
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if not name or not regex.search(name):
            continue
        if hasattr(module, ADAPTER_ATTR) or hasattr(module, "base_layer"):
            raise UserError(f"layer '{name}' already has an adapter attached; detach it first")
        if method.accepts(module):
            found[name] = module
    if not found:
        raise UserError(
            f"target pattern '{pattern}' matches no {'/'.join(t.__name__ for t in method.layer_types)} "
            f"layer of this model (method '{method.name}')"
        )
    return found


class Adapter:
    """Handle over one method attached to a model: count, scale, merge, save, detach."""

    def __init__(self, root: nn.Module, method: type[Method], config: AdapterConfig, slots: dict[str, Slot]) -> None:
        self.root, self.method, self.config, self.slots = root, method, config, slots
        self._scale = 1.0
        self.merged = False
        self.metadata: dict[str, Any] = {}  # extra metadata saved with the file (base model, training config)

    # --- inspection -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.method.name

    @property
    def targets(self) -> list[str]:
        return list(self.slots)

    def named_trainables(self) -> Iterator[tuple[str, nn.Parameter, str]]:
        for layer, slot in self.slots.items():
            for tensor, param, group in slot.named_trainables():
                yield f"{layer}.{tensor}", param, group

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p, _ in self.named_trainables()]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def expected_num_trainable(self) -> int:
        """The documented per-layer formula summed over the targets."""
        return sum(self.method.count_trainable(slot.base, self.config) for slot in self.slots.values())

    def parameter_groups(self, lr: float | None = None) -> list[dict[str, Any]]:
        """Optimiser parameter groups; `lr` sets the main group, other groups keep the method's ratio."""
        base_lr = self.method.train_defaults.lr if lr is None else lr
        groups: dict[str, list[nn.Parameter]] = {}
        for _, param, group in self.named_trainables():
            groups.setdefault(group, []).append(param)
        return [
            {"name": group, "params": params, "lr": base_lr * self.method.group_lr_ratio[group]}
            for group, params in groups.items()
        ]

    # --- strength, merge ----------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if self.merged:
            raise UserError("unmerge the adapter before changing its scale")
        self._scale = float(value)
        for slot in self.slots.values():
            slot.set_scale(self._scale)

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """scale * delta (float32, shaped like each target's weight), per target layer name."""
        return {name: slot.delta() for name, slot in self.slots.items()}

    @torch.no_grad()
    def merge(self) -> None:
        """Fold `scale * delta` into the weights; the live branch is switched off."""
        if self.merged:
            return
        for slot in self.slots.values():
            weight = slot.base.weight
            merged = (weight.float() + slot.delta()).to(weight.dtype)
            slot.original_weight = weight
            slot.base.weight = nn.Parameter(merged, requires_grad=False)
            slot.set_live(False)
        self.merged = True

    def unmerge(self) -> None:
        """Put the original W0 tensors back (bit-exact) and switch the live branch on."""
        if not self.merged:
            return
        for slot in self.slots.values():
            slot.base.weight = slot.original_weight
            slot.original_weight = None
            slot.set_live(True)
        self.merged = False

    def detach(self) -> None:
        """Remove the adapter; the model is the base model again, weights bit-identical."""
        self.unmerge()
        for slot in self.slots.values():
            slot.remove()
        self.slots = {}

    def save(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        from .io import save_adapter

        save_adapter(self, path, metadata)


def attach(
    root: nn.Module,
    method: str,
    _saved: dict[str, dict[str, torch.Tensor]] | None = None,
    _targets: list[str] | None = None,
    **options: Any,
) -> Adapter:
    """Attach `method` (a name from METHODS) to the layers of `root` chosen by its preset/targets.

    Options are the method's config fields (e.g. `rank=32`, `preset="attention"`). All parameters of
    `root` are frozen; only the adapter's tensors train.
    """
    method_cls = get_method(method)
    config = method_cls.make_config(options)
    if _targets is None:
        layers = find_targets(root, method_cls.target_pattern(config), method_cls)
    else:
        layers = {name: root.get_submodule(name) for name in _targets}
    for param in root.parameters():
        param.requires_grad_(False)
    slots = method_cls.attach_layers(layers, config, _saved, root=root)
    adapter = Adapter(root, method_cls, config, slots)
    for param in adapter.parameters():
        param.requires_grad_(True)
    return adapter
