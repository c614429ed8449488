"""Core adapter abstraction and the method registry.

An adapter method re-parameterises a frozen weight `W0` of a target layer as
`W = W0 + scale * delta(theta)` with `delta(theta_init) == 0` exactly (ADAPTERS.md, "delta form").
Each method is one `Method` subclass registered by name; it builds one `LayerAdapter` per target
layer (or, for methods that decompose layers jointly, overrides `build_layers`), which its
`slot_cls` installs (`slots.py`); factor-chain maths is in `factors.py`. What a method offers its
users (options, presets, defaults) is its `Declaration` (`declarations/`, importable without torch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..options import coerce_options
from .declarations import AdapterConfig, Declaration, TrainDefaults
from .forms import Form
from .slots import DeltaSlot, Slot


class LayerAdapter(nn.Module):
    """Trainable tensors and frozen buffers for one target layer.

    `delta_weight()` returns the float32 update with the shape of the layer's weight;
    it is exactly zero at initialisation.
    """

    # Names of tensors (buffers) that cannot be recomputed deterministically from W0 and must be saved.
    saved_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_factors(self) -> list[torch.Tensor] | None:
        """Optional factored form of the update, for speed: tensors whose product is `delta_weight()`
        viewed as `(out, fan_in)` (`fan_in = in*k*k` for a conv), left to right; a 1-D tensor is a
        diagonal. SVFit returns `[U (out, r), ds (r,), V^T (r, in)]`.

        With it, the slot picks per call the cheaper of composing the weight and applying the factors
        to the activations as LoRA does (`DeltaSlot.forms`). None: `delta_weight()` only.
        """
        return None

    def weight_factors(self, scale: float) -> list[torch.Tensor] | None:
        """Optional, with `delta_factors`: factors of the whole adapted weight `W0 + scale * delta`, for
        methods whose frozen basis reproduces W0 (full-rank SVFit: `[U, s + scale * ds, V^T]`, W0 up to
        float rounding). Where it costs less, the slot runs the layer through them alone, skipping
        the matmul with W0 that the update's factors would be added to. None: not available.
        """
        return None

    def own_forms(self, layer: nn.Module, x: torch.Tensor, training: bool) -> dict[str, Form]:
        """Optional: forms of the adapted layer's output on `x` (at `self.scale`, bias included) of the
        method's own (filter atoms mix each input's kernel taps instead of every filter), offered to
        the slot's choice next to composing the weight (`DeltaSlot.forms`). None fit: `{}`."""
        return {}

    def compose_cost(self) -> int:
        """Multiply-adds of `delta_weight()` (used where there are no `delta_factors`): one per weight entry
        unless the method says otherwise."""
        return math.prod(self.weight_shape)

    def param_group(self, name: str) -> str:
        """Learning-rate group of the trainable tensor `name` (see `Method.group_lr_ratio`)."""
        return "main"


class Method:
    """A registered adapter method: per-layer construction of what its `declaration` names.

    `register` copies the declaration's name, description, config class, presets, default preset,
    training defaults and notes onto the class (`declarations/`: their one home, light to import).
    """

    declaration: ClassVar[Declaration]
    name: ClassVar[str]
    description: ClassVar[str]
    config_cls: ClassVar[type[AdapterConfig]]
    presets: ClassVar[dict[str, str]]
    default_preset: ClassVar[str]
    train_defaults: ClassVar[TrainDefaults]
    notes: ClassVar[tuple[str, ...]]
    layer_cls: ClassVar[type[LayerAdapter]]
    slot_cls: ClassVar[type[DeltaSlot]] = DeltaSlot  # installs each LayerAdapter on its layer and runs it
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)
    # Learning rate of each parameter group relative to "main" (FRoD trains S at 1/10 the lr of dsigma).
    group_lr_ratio: ClassVar[dict[str, float]] = {"main": 1.0}

    @classmethod
    def make_config(cls, options: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls.config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)} for method '{cls.name}'; accepted: {', '.join(sorted(known))}")
        config = cls.config_cls(**coerce_options(cls.config_cls, options, cls.name))  # typed, or UserError
        if not config.preset:
            config.preset = cls.default_preset
        if config.targets is None and config.preset not in cls.presets:
            raise UserError(f"unknown preset '{config.preset}' for method '{cls.name}'; accepted: {', '.join(cls.presets)}")
        cls.validate(config)
        return config

    @classmethod
    def validate(cls, config: AdapterConfig) -> None:
        """Raise UserError for option values the method cannot use."""

    @classmethod
    def target_pattern(cls, config: AdapterConfig) -> str:
        return config.targets if config.targets is not None else cls.presets[config.preset]

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.layer_types)

    @classmethod
    def build_layers(
        cls,
        layers: dict[str, nn.Module],
        config: AdapterConfig,
        saved: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, LayerAdapter]:
        """One adapter per target layer; `saved` holds tensors from an adapter file, per layer."""
        saved = saved or {}
        return {name: cls.layer_cls(layer, config, saved.get(name, {})) for name, layer in layers.items()}

    @classmethod
    def attach_layers(
        cls,
        layers: dict[str, nn.Module],
        config: AdapterConfig,
        saved: dict[str, dict[str, torch.Tensor]] | None = None,
        root: nn.Module | None = None,
    ) -> dict[str, Slot]:
        """Install the method on the target layers of `root`; returns one slot per layer. All layer
        adapters are built before the first is installed, so a failure leaves the model untouched."""
        adapters = cls.build_layers(layers, config, saved)
        slots: dict[str, Slot] = {}
        try:
            for name, layer in layers.items():
                slots[name] = cls.slot_cls(layer, adapters[name])
        except BaseException:
            for slot in slots.values():
                slot.remove()
            raise
        return slots

    @classmethod
    def shared_tensors(cls, slots: dict[str, Slot]) -> dict[str, torch.Tensor]:
        """Tensors shared by several layers that the file must store once (e.g. FRoD's group bases).
        On load they come back to `build_layers` as `saved[SHARED_KEY]`."""
        return {}

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: AdapterConfig) -> int:
        """The documented formula for the trainable parameters of one layer."""
        raise NotImplementedError


METHOD_REGISTRY: dict[str, type[Method]] = {}
SHARED_KEY = "__shared__"  # prefix of shared tensors in adapter files


def register(method: type[Method]) -> type[Method]:
    """Register `method` under its declaration's name, with the declared attributes set on the class."""
    declared = method.declaration
    method.name, method.description, method.config_cls = declared.name, declared.description, declared.config_cls
    method.presets, method.default_preset = declared.presets, declared.default_preset
    method.train_defaults, method.notes = declared.train_defaults, declared.notes
    METHOD_REGISTRY[method.name] = method
    return method


def weight_2d(layer: nn.Module) -> torch.Tensor:
    """The layer's weight viewed as a matrix: (out, in) for Linear, (out, in*k*k) for Conv2d."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)
