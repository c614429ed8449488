"""Core adapter abstraction and the method registry.

An adapter method re-parameterises a frozen weight `W0` of a target layer as
`W = W0 + scale * delta(theta)` with `delta(theta_init) == 0` exactly (ADAPTERS.md, "delta form").
Each method is one `Method` subclass registered by name; it builds one `LayerAdapter` per target
layer (or, for methods that decompose layers jointly, overrides `build_layers`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError

# Attention projections of every diffusers transformer block: self (attn1) and cross (attn2) attention.
ATTENTION = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
# Transformer-block input/output projections (Conv2d 1x1 in SD 1.x, Linear in SD 2.x / SDXL).
PROJECTIONS = r"attentions\.\d+\.(proj_in|proj_out)$"
# Feed-forward linears of transformer blocks (GEGLU input projection and output).
FEED_FORWARD = r"ff\.net\.(0\.proj|2)$"


def join_patterns(*patterns: str) -> str:
    return "|".join(f"(?:{p})" for p in patterns)


@dataclass
class AdapterConfig:
    """Options every method shares. Subclasses add method options with paper defaults."""

    preset: str = ""  # name of a target preset of the method; "" = the method's default preset
    targets: str | None = None  # regular expression over module names; overrides the preset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    def param_group(self, name: str) -> str:
        """Learning-rate group of the trainable tensor `name` (see `Method.group_lr_ratio`)."""
        return "main"


@dataclass
class TrainDefaults:
    """Per-method training defaults taken from the papers (documented in README's table)."""

    lr: float
    steps: int
    source: str  # where the values come from


class Method:
    """A registered adapter method: config class, target presets, per-layer construction."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown in the CLI and the app
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    layer_cls: ClassVar[type[LayerAdapter]]
    presets: ClassVar[dict[str, str]] = {"attention": ATTENTION}
    default_preset: ClassVar[str] = "attention"
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)
    train_defaults: ClassVar[TrainDefaults]
    # Learning rate of each parameter group relative to "main" (FRoD trains S at 1/10 the lr of dsigma).
    group_lr_ratio: ClassVar[dict[str, float]] = {"main": 1.0}

    @classmethod
    def make_config(cls, options: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls.config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(
                f"unknown option(s) {', '.join(unknown)} for method '{cls.name}'; "
                f"accepted: {', '.join(sorted(known))}"
            )
        config = cls.config_cls(**options)
        if not config.preset:
            config.preset = cls.default_preset
        if config.targets is None and config.preset not in cls.presets:
            raise UserError(
                f"unknown preset '{config.preset}' for method '{cls.name}'; "
                f"accepted: {', '.join(cls.presets)}"
            )
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
    ) -> dict[str, "Slot"]:
        """Install the method on the target layers of `root`; returns one slot per layer."""
        adapters = cls.build_layers(layers, config, saved)
        return {name: DeltaSlot(layers[name], adapters[name]) for name in layers}

    @classmethod
    def shared_tensors(cls, slots: dict[str, "Slot"]) -> dict[str, torch.Tensor]:
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
    if not re.fullmatch(r"[a-z][a-z0-9_]*", method.name):
        raise ValueError(f"bad method name {method.name!r}")
    METHOD_REGISTRY[method.name] = method
    return method


def get_method(name: str) -> type[Method]:
    from . import ensure_registered

    ensure_registered()
    if name not in METHOD_REGISTRY:
        raise UserError(f"unknown method '{name}'; accepted: {', '.join(sorted(METHOD_REGISTRY))}")
    return METHOD_REGISTRY[name]


def weight_2d(layer: nn.Module) -> torch.Tensor:
    """The layer's weight viewed as a matrix: (out, in) for Linear, (out, in*k*k) for Conv2d."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)



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


ADAPTER_ATTR = "personalize_adapter"


class DeltaSlot(Slot):
    """Installs a LayerAdapter on its layer: forward uses `W0 + scale * delta` in one F.linear/conv."""

    def __init__(self, base: nn.Module, adapter: LayerAdapter) -> None:
        super().__init__(base)
        if hasattr(base, ADAPTER_ATTR):
            raise UserError("layer already has an adapter attached; detach it first")
        self.adapter = adapter.to(base.weight.device)
        base.add_module(ADAPTER_ATTR, self.adapter)
        self.live = True
        base.forward = self._forward  # instance attribute; `del` restores the class's forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        base, adapter = self.base, self.adapter
        weight = base.weight
        if self.live and adapter.scale != 0.0:
            with torch.autocast(device_type=weight.device.type, enabled=False):
                delta = adapter.delta_weight() * adapter.scale
            weight = weight + delta.to(weight.dtype)
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, weight, base.bias)
        return nn.functional.linear(x, weight, base.bias)

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
