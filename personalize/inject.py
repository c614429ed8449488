"""Adapters on a model: find target layers, attach, merge, unmerge, scale, detach, save and load.

`attach(unet, "svfit")` returns an `Adapter` handle over one slot per target layer. Every method
shares this plumbing. Merging has one home, `add_deltas` / `merged_deltas`: a layer's weight is
swapped for `W0 + sum_i scale_i * delta_i` (summed in float32, cast once) and W0 is kept aside,
so putting it back restores the base model bit-exactly (`Adapter.merge` and `generate` both use it).

Loading one part of a file onto one model (`load_part`) is transactional: the part (read and checked
by `io`) is checked against the model before anything is attached, the tensors against the built
adapter before anything is loaded, and on any error the model is left exactly as it was. A single
model's adapter is a file's "unet" part (`io.MAIN_PART`); files with more parts or with tokens go
onto a whole pipeline (`pipeline_adapter.load_adapter`).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import get_method
from .adapters.base import SHARED_KEY, AdapterConfig, Method
from .adapters.slots import ADAPTER_ATTR, Slot
from .errors import UserError
from .io import MAIN_PART, AdapterFile, AdapterPart, read_adapter_file, write_adapter_file

Deltas = Mapping[str, torch.Tensor]  # float32 update per layer name (of the root module), shaped like W0


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
        check_free(name, module)
        if method.accepts(module):
            found[name] = module
    if not found:
        raise UserError(
            f"target pattern '{pattern}' matches no {'/'.join(t.__name__ for t in method.layer_types)} "
            f"layer of this model (method '{method.name}')"
        )
    return found


def check_free(name: str, module: nn.Module) -> None:
    if hasattr(module, ADAPTER_ATTR) or hasattr(module, "base_layer"):
        raise UserError(f"layer '{name}' already has an adapter attached; detach it first")


def check_scale(value: object, what: str = "adapter scale") -> float:
    """`value` as a float if it is a finite number; UserError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{what} must be a finite number (1 = as trained, 0 = off), got {value!r}")
    return float(value)


def weight_owner(root: nn.Module, name: str) -> nn.Module:
    """The module holding layer `name`'s weight (peft wraps the original layer as `base_layer`)."""
    module = root.get_submodule(name)
    return getattr(module, "base_layer", module)


@torch.no_grad()
def add_deltas(root: nn.Module, updates: Sequence[tuple[Deltas, float]]) -> dict[str, nn.Parameter]:
    """Swap each touched layer's weight for `W0 + sum_i scale_i * delta_i`; returns the W0 parameters
    set aside, for `restore_weights`. A non-finite scale or merged weight is refused, weights untouched."""
    total: dict[str, torch.Tensor] = {}  # float32, on each layer's device
    for deltas, scale in updates:
        scale = check_scale(scale)
        if scale == 0.0:
            continue  # exactly the base model for this update
        for name, delta in deltas.items():
            part = delta.to(weight_owner(root, name).weight.device, torch.float32) * scale
            total[name] = total[name] + part if name in total else part
    originals: dict[str, nn.Parameter] = {}
    try:
        for name, delta in total.items():
            layer = weight_owner(root, name)
            weight = layer.weight
            merged = (weight.float() + delta).to(weight.dtype)
            if not bool(torch.isfinite(merged).all()):
                raise UserError(
                    f"merging the adapters makes layer '{name}' non-finite in {weight.dtype}; "
                    "an adapter scale is too large (or the adapter holds huge values): use a smaller strength"
                )
            originals[name] = weight
            layer.weight = nn.Parameter(merged, requires_grad=False)
    except BaseException:
        restore_weights(root, originals)
        raise
    return originals


def restore_weights(root: nn.Module, originals: Mapping[str, nn.Parameter]) -> None:
    """Put the W0 parameters `add_deltas` set aside back (the same tensors: bit-exact)."""
    for name, weight in originals.items():
        weight_owner(root, name).weight = weight


@contextmanager
def merged_deltas(root: nn.Module, updates: Sequence[tuple[Deltas, float]]) -> Iterator[None]:
    """Within the block the weights are `W0 + sum_i scale_i * delta_i`; W0 is restored after."""
    originals = add_deltas(root, updates)
    try:
        yield
    finally:
        restore_weights(root, originals)


class Trainables:
    """`parameters()` and `num_trainable` of an object that yields `named_trainables()`
    ((name, parameter, optimiser group) triples): an Adapter, or a PipelineAdapter of several."""

    def named_trainables(self) -> Iterator[tuple[str, nn.Parameter, str]]:
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p, _ in self.named_trainables()]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Adapter(Trainables):
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

    def expected_num_trainable(self) -> int:
        """The documented per-layer formula summed over the targets."""
        return sum(self.method.count_trainable(slot.base, self.config) for slot in self.slots.values())

    def parameter_groups(self, lr: float | None = None) -> list[dict[str, Any]]:
        """Optimiser parameter groups; `lr` sets the main group, other groups keep the method's ratio."""
        base_lr = self.method.train_defaults.lr if lr is None else lr
        groups: dict[str, list[nn.Parameter]] = {}
        for _, param, group in self.named_trainables():
            groups.setdefault(group, []).append(param)
        return [{"name": group, "params": params, "lr": base_lr * self.method.group_lr_ratio[group]} for group, params in groups.items()]

    # --- strength, merge ----------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if self.merged:
            raise UserError("unmerge the adapter before changing its scale")
        self._scale = check_scale(value)
        for slot in self.slots.values():
            slot.set_scale(self._scale)

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """scale * delta (float32, shaped like each target's weight), per target layer name."""
        return {name: slot.delta() for name, slot in self.slots.items()}

    @contextmanager
    def switched_off(self) -> Iterator[None]:
        """Inside, every adapted layer runs its frozen weight alone (the base model, exactly); the
        adapter's tensors and scale are untouched (training's prior from the model uses this)."""
        if self.merged:
            raise UserError("unmerge the adapter before switching it off")
        for slot in self.slots.values():
            slot.set_live(False)
        try:
            yield
        finally:
            for slot in self.slots.values():
                slot.set_live(True)

    def merge(self) -> None:
        """Fold `scale * delta` into the weights (`add_deltas`); the live branch is switched off."""
        if self.merged:
            return
        originals = add_deltas(self.root, [(self.deltas(), 1.0)])
        for name, slot in self.slots.items():
            slot.original_weight = originals[name]
            slot.set_live(False)
        self.merged = True

    def unmerge(self) -> None:
        """Put the original W0 tensors back (bit-exact) and switch the live branch on."""
        if not self.merged:
            return
        restore_weights(self.root, {name: slot.original_weight for name, slot in self.slots.items()})
        for slot in self.slots.values():
            slot.original_weight = None
            slot.set_live(True)
        self.merged = False

    def detach(self) -> None:
        """Remove the adapter; the model is the base model again, weights bit-identical."""
        self.unmerge()
        for slot in self.slots.values():
            slot.remove()
        self.slots = {}

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        return save_adapter(self, path, metadata)


def attach(root: nn.Module, method: str, **options: Any) -> Adapter:
    """Attach `method` (a name from METHODS) to the layers of `root` chosen by its preset/targets.

    Options are the method's config fields (e.g. `rank=32`, `preset="attention"`). All parameters of
    `root` are frozen; only the adapter's tensors train.
    """
    method_cls = get_method(method)
    config = method_cls.make_config(options)
    layers = find_targets(root, method_cls.target_pattern(config), method_cls)
    return _trainable(Adapter(root, method_cls, config, method_cls.attach_layers(layers, config, None, root=root)))


def _trainable(adapter: Adapter) -> Adapter:
    for param in adapter.root.parameters():
        param.requires_grad_(False)
    for param in adapter.parameters():
        param.requires_grad_(True)
    return adapter


def base_model_id(root: nn.Module) -> str:
    config = getattr(root, "config", None)
    return str(getattr(config, "_name_or_path", "") or "") if config is not None else ""


def adapter_part(adapter: Adapter) -> AdapterPart:
    """The file section of an attached adapter: its method, options, layers and tensors."""
    tensors = {name: slot.saved_tensors() for name, slot in adapter.slots.items()}
    tensors[SHARED_KEY] = adapter.method.shared_tensors(adapter.slots)
    return AdapterPart(
        method=adapter.name,
        config=adapter.config.to_dict(),
        layers={name: list(slot.base.weight.shape) for name, slot in adapter.slots.items()},
        tensors=tensors,
        num_trainable=adapter.num_trainable,
    )


def save_adapter(adapter: Adapter, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapter atomically, as the file's only part; `metadata` (JSON-serialisable) is stored alongside."""
    extra = {**adapter.metadata, **(metadata or {})}
    return write_adapter_file(
        AdapterFile(
            path=Path(path),
            parts={MAIN_PART: adapter_part(adapter)},
            base_model=str(extra.pop("base_model", None) or base_model_id(adapter.root)),
            num_trainable=adapter.num_trainable,
            metadata=extra,
        )
    )


def load_adapter(root: nn.Module, path: str | Path, part: str | None = None) -> Adapter:
    """Attach the adapter stored in `path` to the model `root`: the file's part `part`, or with None its
    only part, which must be the "unet" one (a file with text-encoder parts or tokens is a UserError:
    it goes onto the whole pipeline, `personalize.load_adapter(pipe, path)`)."""
    file = read_adapter_file(path)
    if part is None:
        if not file.single_part:
            tokens = list(dict.fromkeys(token for found in file.tokens.values() for token in found))
            held = f"parts {', '.join(file.parts) or 'none'}" + (f" and tokens {', '.join(tokens)}" if tokens else "")
            raise UserError(
                f"adapter file '{file.path}' holds {held}: load it into the pipeline "
                "(personalize.load_adapter(pipe, path)), not into a single model"
            )
        part = MAIN_PART
    return load_part(root, file, part)


def load_part(root: nn.Module, file: AdapterFile, part: str) -> Adapter:
    """Attach part `part` of the read `file` to `root`. Transactional: every problem with the file is a
    UserError naming it, and leaves `root` exactly as it was."""
    where = f"adapter file '{file.path}'" + ("" if part == MAIN_PART else f" (part '{part}')")
    if part not in file.parts:
        held = ", ".join(file.parts) or "none"
        raise UserError(f"adapter file '{file.path}' has no part '{part}'; it holds: {held}")
    section = file.parts[part]
    try:
        method = get_method(section.method)
        config = method.make_config(section.config)
        layers = _file_targets(root, section, method, file.base_model)
        trainable = [(param, param.requires_grad) for param in root.parameters()]  # peft freezes the model
        slots: dict[str, Slot] = {}
        try:
            slots = method.attach_layers(layers, config, section.tensors, root=root)
            _check_tensors(section, method, slots)
            for name, slot in slots.items():
                slot.load_tensors({k: v.to(slot.base.weight.device) for k, v in section.tensors[name].items()})
        except BaseException:
            for slot in slots.values():
                slot.remove()
            for param, flag in trainable:
                param.requires_grad_(flag)
            raise
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    adapter = Adapter(root, method, config, slots)
    adapter.metadata = file.metadata
    return _trainable(adapter)


def _file_targets(root: nn.Module, section: AdapterPart, method: type[Method], base_model: str) -> dict[str, nn.Module]:
    """The model's layers the file's part lists, each checked to exist, match its shape and be free."""
    modules = dict(root.named_modules())
    found = {}
    for name, shape in section.layers.items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise UserError(
                f"it targets layer '{name}', which this model does not have; "
                f"it was saved for another architecture ({base_model or 'unknown base'})"
            )
        if list(module.weight.shape) != shape:
            raise UserError(
                f"it expects layer '{name}' with weight shape {tuple(shape)}, this model has {tuple(module.weight.shape)}; "
                "it was saved for another architecture"
            )
        if not method.accepts(module):
            raise UserError(f"layer '{name}' is a {type(module).__name__}, which method '{method.name}' does not adapt")
        check_free(name, module)
        found[name] = module
    if not found:
        raise UserError("it lists no target layer")
    return found


def _check_tensors(section: AdapterPart, method: type[Method], slots: dict[str, Slot]) -> None:
    """The part's tensors against those the attached method stores: same names, shapes and kinds."""
    expected = {name: slot.saved_tensors() for name, slot in slots.items()}
    expected[SHARED_KEY] = method.shared_tensors(slots)
    for layer, wanted in expected.items():
        where = "the shared section" if layer == SHARED_KEY else f"layer '{layer}'"
        found = section.tensors.get(layer, {})
        missing, unknown = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
        if missing or unknown:
            problem = f"has no tensor '{missing[0]}'" if missing else f"has unknown tensor '{unknown[0]}'"
            raise UserError(f"{where} {problem}; method '{method.name}' expects {', '.join(sorted(wanted)) or 'none'}")
        for name, reference in wanted.items():
            tensor = found[name]
            if tuple(tensor.shape) != tuple(reference.shape):
                raise UserError(f"tensor '{name}' of {where} has shape {tuple(tensor.shape)}; expected {tuple(reference.shape)}")
            if tensor.is_floating_point() != reference.is_floating_point() or (tensor.dtype == torch.bool) != (
                reference.dtype == torch.bool
            ):
                raise UserError(f"tensor '{name}' of {where} has dtype {tensor.dtype}; expected {reference.dtype}")
