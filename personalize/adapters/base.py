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
from ..options import coerce_options

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

    def delta_factors(self) -> list[torch.Tensor] | None:
        """Optional factored form of the update, for speed: tensors whose product is `delta_weight()`
        viewed as `(out, fan_in)` (`fan_in = in*k*k` for a conv), left to right; a 1-D tensor is a
        diagonal. SVFit returns `[U (out, r), ds (r,), V^T (r, in)]`.

        With it, the slot picks per call the cheaper of composing the weight and applying the factors
        to the activations as LoRA does (`DeltaSlot.prefers_activations`). None: `delta_weight()` only.
        """
        return None

    def weight_factors(self, scale: float) -> list[torch.Tensor] | None:
        """Optional, with `delta_factors`: factors of the whole adapted weight `W0 + scale * delta`, for
        methods whose frozen basis reproduces W0 (full-rank SVFit: `[U, s + scale * ds, V^T]`, W0 up to
        float rounding). Where it costs less, the slot runs the layer through them alone, skipping
        the matmul with W0 that the update's factors would be added to. None: not available.
        """
        return None

    def own_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Optional: the adapted layer's output on `x` (at `self.scale`, bias included), computed the
        method's own way where that costs less than composing the weight (filter atoms mix each
        input's kernel taps instead of every filter). None: let the slot compose or use the factors.
        """
        return None

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
        config = cls.config_cls(**coerce_options(cls.config_cls, options, cls.name))  # typed, or UserError
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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's where it is on for x's device, else x's own. Casting
    a method's tensors to it once avoids a float32 copy that autocast would cast back to 16 bits."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


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

    def install(self) -> None:
        """Put the live update branch back after `remove()`, with the same adapter tensors (the
        benchmark swaps methods on one model this way instead of decomposing again)."""
        raise NotImplementedError


ADAPTER_ATTR = "personalize_adapter"


class DeltaSlot(Slot):
    """Installs a LayerAdapter on its layer. The forward runs the layer with `W0 + scale * delta`
    (one F.linear / conv) or, when the adapter has a factored form and that costs less (`plan`),
    `layer(x, W0) + x @ (scale * delta)^T` through the factors, or x through the whole weight's factors."""

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
        base, adapter = self.base, self.adapter
        if not self.live or adapter.scale == 0.0:
            return self._run(x, base.weight)
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
        weight = base.weight
        with torch.autocast(device_type=weight.device.type, enabled=False):  # compose in float32
            delta = adapter.delta_weight() if factors is None else compose(factors).view(weight.shape)
        return self._run(x, torch.add(weight, delta.to(weight.dtype), alpha=adapter.scale))

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
            "activations": _activation_cost(tokens, factors, training) + (2 if training else 1) * layer,
        }
        if full is not None:
            costs["full"] = _activation_cost(tokens, full, training)
        return min(costs, key=costs.__getitem__)

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


def _activation_cost(tokens: int, factors: list[torch.Tensor], training: bool) -> int:
    """Multiply-adds of passing `tokens` rows through the factors (and back, with their gradients)."""
    matrices = [f for f in factors if f.dim() == 2]
    cost = tokens * sum(m.numel() for m in matrices)
    if training:
        cost = 2 * cost + tokens * sum(m.numel() for m in matrices if m.requires_grad)
    return cost


def scaled(factors: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """The factors with `scale` folded into the smallest one."""
    if scale == 1.0:
        return factors
    smallest = min(range(len(factors)), key=lambda i: factors[i].numel())
    return [f * scale if i == smallest else f for i, f in enumerate(factors)]


def chain_cost(factors: list[torch.Tensor]) -> int:
    """Multiply-adds of `compose(factors)` (the cheaper of the two orders it tries)."""
    return min(_ordered_cost(factors), _ordered_cost([f.T if f.dim() == 2 else f for f in reversed(factors)]))


def _ordered_cost(factors: list[torch.Tensor]) -> int:
    rows, cols, cost = None, None, 0
    for f in factors:
        if f.dim() == 1:
            cost += 0 if rows is None else rows * f.numel()
            continue
        if rows is None:
            rows, cols = f.shape
        else:
            cost += rows * cols * f.shape[1]
            cols = f.shape[1]
    return cost


def compose(factors: list[torch.Tensor]) -> torch.Tensor:
    """The product of a factor chain (1-D = diagonal) as an (out, fan_in) matrix, in the cheaper order."""
    if _ordered_cost(factors) <= _ordered_cost([f.T if f.dim() == 2 else f for f in reversed(factors)]):
        return _left_to_right(factors)
    return _left_to_right([f.T if f.dim() == 2 else f for f in reversed(factors)]).T


def _left_to_right(factors: list[torch.Tensor]) -> torch.Tensor:
    result, pending = None, None  # pending: diagonals met before the first matrix
    for f in factors:
        if f.dim() == 1:
            if result is None:
                pending = f if pending is None else pending * f
            else:
                result = result * f  # scales the columns
        else:
            if result is None:
                result = f if pending is None else pending[:, None] * f
            else:
                result = result @ f
    assert result is not None, "a factor chain needs at least one matrix"
    return result
