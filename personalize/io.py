"""Adapter files: safetensors with the trainable tensors (plus what cannot be recomputed, such as
LoLDU pivots or FRoD bases) and JSON metadata (method, config, target layers, base model, version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.base import SHARED_KEY
from .atomic import atomic_path
from .errors import UserError
from .inject import Adapter, attach

FORMAT = "personalize.adapter"
FORMAT_VERSION = 1


def base_model_id(root: nn.Module) -> str:
    config = getattr(root, "config", None)
    return str(getattr(config, "_name_or_path", "") or "") if config is not None else ""


def save_adapter(adapter: Adapter, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapter atomically; `metadata` (JSON-serialisable) is stored alongside."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, list[int]] = {}
    for name, slot in adapter.slots.items():
        layers[name] = list(slot.base.weight.shape) if slot.original_weight is None else list(slot.original_weight.shape)
        for tensor_name, tensor in slot.saved_tensors().items():
            tensors[f"{name}.{tensor_name}"] = tensor.detach().to("cpu").contiguous()
    for name, tensor in adapter.method.shared_tensors(adapter.slots).items():
        tensors[f"{SHARED_KEY}.{name}"] = tensor.detach().to("cpu").contiguous()
    extra = {**adapter.metadata, **(metadata or {})}
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "method": adapter.name,
        "config": json.dumps(adapter.config.to_dict()),
        "layers": json.dumps(layers),
        "base_model": str(extra.pop("base_model", None) or base_model_id(adapter.root)),
        "num_trainable": str(adapter.num_trainable),
        "metadata": json.dumps(extra, default=str),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header, tensors) of an adapter file, with clear errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file '{path}' does not exist (expected a .safetensors file saved by personalize)")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"'{path}' is not a readable safetensors file: {exc}") from exc
    if header.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a personalize adapter file (no '{FORMAT}' header)")
    if int(header.get("format_version", "0")) > FORMAT_VERSION:
        raise UserError(f"'{path}' was written by a newer version (format {header['format_version']}); upgrade personalize")
    return header, tensors


def adapter_info(path: str | Path) -> dict[str, Any]:
    """Method, config, base model and metadata of an adapter file, without loading a model."""
    header, tensors = read_adapter_file(path)
    return {
        "method": header["method"],
        "config": json.loads(header["config"]),
        "layers": json.loads(header["layers"]),
        "base_model": header.get("base_model", ""),
        "num_trainable": int(header.get("num_trainable", "0")),
        "metadata": json.loads(header.get("metadata", "{}")),
        "file_size": Path(path).stat().st_size,
    }


def load_adapter(root: nn.Module, path: str | Path) -> Adapter:
    """Attach the adapter stored in `path` to `root`, checking that every target layer matches."""
    header, tensors = read_adapter_file(path)
    layers: dict[str, list[int]] = json.loads(header["layers"])
    modules = dict(root.named_modules())
    for name, shape in layers.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise UserError(f"adapter '{path}' targets layer '{name}', which this model does not have; it was saved for another architecture ({header.get('base_model') or 'unknown base'})")
        if list(module.weight.shape) != shape:
            raise UserError(f"adapter '{path}' expects layer '{name}' with weight shape {tuple(shape)}, this model has {tuple(module.weight.shape)}; it was saved for another architecture")
    per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    per_layer[SHARED_KEY] = {}
    for key, tensor in tensors.items():
        if key.startswith(SHARED_KEY + "."):
            per_layer[SHARED_KEY][key[len(SHARED_KEY) + 1 :]] = tensor
            continue
        layer, _, tensor_name = key.rpartition(".")
        per_layer[layer][tensor_name] = tensor
    config = json.loads(header["config"])
    adapter = attach(root, header["method"], _saved=per_layer, _targets=list(layers), **config)
    for name, slot in adapter.slots.items():
        slot.load_tensors({k: v.to(slot.base.weight.device) for k, v in per_layer[name].items()})
    adapter.metadata = json.loads(header.get("metadata", "{}"))
    return adapter
