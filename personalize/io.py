"""Adapter files, the format only: safetensors holding each target layer's tensors (the trainable ones
plus what cannot be recomputed, such as LoLDU pivots or FRoD bases) and JSON metadata (method,
config, target layers with their weight shapes, base model, version). No model knowledge: attaching
a file to a model is `inject.load_adapter`.

Tensor keys are `<layer>.<tensor>` (tensor names have no dots) and `__shared__.<name>` for tensors
several layers share. Reading checks everything the file alone can show: the header entries parse,
every tensor belongs to a listed layer, and every floating tensor is finite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .adapters.base import SHARED_KEY
from .atomic import atomic_path
from .errors import UserError

FORMAT = "personalize.adapter"
FORMAT_VERSION = 1


@dataclass
class AdapterFile:
    """The contents of an adapter file, parsed and checked."""

    path: Path
    method: str
    config: dict[str, Any]  # the method's options
    layers: dict[str, list[int]]  # target layer name -> its weight shape
    tensors: dict[str, dict[str, torch.Tensor]]  # layer name (or SHARED_KEY) -> tensor name -> tensor
    base_model: str = ""
    num_trainable: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)  # token, class noun, training config, ...


def write_adapter_file(file: AdapterFile) -> Path:
    """Write `file` atomically (to `file.path`)."""
    flat = {
        f"{layer}.{name}": tensor.detach().to("cpu").contiguous()
        for layer, tensors in file.tensors.items()
        for name, tensor in tensors.items()
    }
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "method": file.method,
        "config": json.dumps(file.config),
        "layers": json.dumps(file.layers),
        "base_model": file.base_model,
        "num_trainable": str(file.num_trainable),
        "metadata": json.dumps(file.metadata, default=str),
    }
    with atomic_path(file.path) as tmp:
        save_file(flat, str(tmp), metadata=header)
    return file.path


def read_adapter_file(path: str | Path) -> AdapterFile:
    """Parse and check an adapter file; any problem is a UserError naming the file and the bad entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file '{path}' does not exist (expected a .safetensors file saved by personalize)")
    try:
        flat = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"'{path}' is not a readable safetensors file: {exc}") from exc
    if header.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a personalize adapter file (no '{FORMAT}' header)")
    version = header.get("format_version", "0")
    if not version.isdigit():
        raise UserError(f"adapter file '{path}' has format_version '{version}' in its header; expected an integer")
    if int(version) > FORMAT_VERSION:
        raise UserError(f"'{path}' was written by a newer version (format {version}); upgrade personalize")
    method = _entry(path, header, "method", str)
    layers = _entry(path, header, "layers", dict)
    for name, shape in layers.items():
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise UserError(f"adapter file '{path}' lists layer '{name}' with weight shape {shape!r}; expected a list of positive integers")
    return AdapterFile(
        path=path,
        method=method,
        config=_entry(path, header, "config", dict),
        layers=layers,
        tensors=_split_keys(path, flat, layers),
        base_model=header.get("base_model", ""),
        num_trainable=int(header["num_trainable"]) if header.get("num_trainable", "").isdigit() else 0,
        metadata=_entry(path, header, "metadata", dict, default="{}"),
    )


def _entry(path: Path, header: dict[str, str], key: str, kind: type, default: str | None = None) -> Any:
    """Header entry `key`: the text itself for `str`, else its JSON value, which must be a `kind`."""
    text = header.get(key, default)
    if text is None:
        raise UserError(f"adapter file '{path}' has no '{key}' entry in its header (a damaged or hand-edited file)")
    if kind is str:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"adapter file '{path}': header entry '{key}' is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, kind):
        raise UserError(f"adapter file '{path}': header entry '{key}' is {type(value).__name__}; expected a JSON object")
    return value


def _split_keys(path: Path, flat: dict[str, torch.Tensor], layers: dict[str, list[int]]) -> dict[str, dict[str, torch.Tensor]]:
    """`<layer>.<tensor>` keys grouped per layer (shared tensors under SHARED_KEY), each one finite."""
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    tensors[SHARED_KEY] = {}
    for key, tensor in flat.items():
        layer, _, name = key.rpartition(".")
        if key.startswith(SHARED_KEY + "."):
            layer, name = SHARED_KEY, key[len(SHARED_KEY) + 1 :]
        elif layer not in layers:
            raise UserError(
                f"adapter file '{path}' holds tensor '{key}' of no layer listed in its header; "
                "expected '<layer>.<tensor>' for a listed layer"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            where = "the shared section" if layer == SHARED_KEY else f"layer '{layer}'"
            raise UserError(
                f"adapter file '{path}': tensor '{name}' of {where} holds NaN or infinite values; "
                "the adapter is unusable (retrain it or use an earlier checkpoint)"
            )
        tensors[layer][name] = tensor
    return tensors


def adapter_info(path: str | Path) -> dict[str, Any]:
    """Method, config, base model and metadata of an adapter file, without loading a model."""
    file = read_adapter_file(path)
    return {
        "method": file.method,
        "config": file.config,
        "layers": file.layers,
        "base_model": file.base_model,
        "num_trainable": file.num_trainable,
        "metadata": file.metadata,
        "file_size": file.path.stat().st_size,
    }
