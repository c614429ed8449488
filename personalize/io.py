"""Adapter files, the format only: safetensors holding each adapted layer's tensors (the trainable ones
plus what cannot be recomputed, such as LoLDU pivots or FRoD bases), learned token embeddings, and
JSON metadata (method, config, target layers with their weight shapes, base model, version). No model
knowledge: attaching a file to a model is `inject.load_part`, to a pipeline `pipeline_adapter.load_adapter`.

A file holds one or more *parts*, one per pipeline component adapted (`PARTS`: the UNet, the text
encoder(s)), each with its own method and options, and optionally learned tokens per text encoder
(pivotal tuning): `{token: (n_vectors, width)}`, one row per vector of the token.

Layout, format_version 1: one part, no tokens. Every file written before text encoders could be
adapted, and still what the writer produces for a UNet-only adapter, so these files read exactly as
before (and by older versions). The part is the "unet" part.

    header   method, config, layers {layer: weight shape}, num_trainable, base_model, metadata
    tensors  <layer>.<tensor>            e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.ds
             __shared__.<name>           tensors several layers share (FRoD's group bases)

Layout, format_version 2: any other content (several parts, or tokens).

    header   parts   {part: {method, config, layers, num_trainable}}      (part in PARTS)
             tokens  {text part: [token, ...]}                             (insertion order)
             num_trainable (all parts and tokens), base_model, metadata
    tensors  <part>.<layer>.<tensor>     e.g. text_encoder.encoder.layers.0.self_attn.q_proj.lora_A
             <part>.__shared__.<name>
             <part>.__token__.<token>    (n_vectors, width) float; the token verbatim (it may hold dots)

Tensor names have no dots, so `<layer>.<tensor>` splits at the last dot. Reading checks everything
the file alone can show: the header entries parse, every tensor belongs to a listed layer or token,
every listed token has its vectors, and every floating tensor is finite.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .adapters.base import SHARED_KEY
from .atomic import atomic_path
from .errors import UserError

log = logging.getLogger(__name__)

FORMAT = "personalize.adapter"
FORMAT_VERSION = 2
SINGLE_PART_VERSION = 1  # one "unet" part and no tokens: written in the original layout
PARTS = ("unet", "text_encoder", "text_encoder_2")  # the pipeline components a file holds parts for
TEXT_PARTS = PARTS[1:]  # the parts that have a tokenizer, hence can hold tokens
MAIN_PART = "unet"  # the part of a version-1 file, and the one a single model's adapter is saved as
TOKEN_KEY = "__token__"  # <part>.__token__.<token>


@dataclass
class AdapterPart:
    """One part of an adapter file: a method attached to one model (the UNet or a text encoder)."""

    method: str
    config: dict[str, Any]  # the method's options
    layers: dict[str, list[int]]  # target layer name -> its weight shape
    tensors: dict[str, dict[str, torch.Tensor]]  # layer name (or SHARED_KEY) -> tensor name -> tensor
    num_trainable: int = 0

    def header(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, "layers": self.layers, "num_trainable": self.num_trainable}


@dataclass
class AdapterFile:
    """The contents of an adapter file, parsed and checked."""

    path: Path
    parts: dict[str, AdapterPart]  # part name (PARTS) -> its section
    tokens: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # text part -> token -> (n_vectors, width)
    base_model: str = ""
    num_trainable: int = 0  # all parts and tokens
    metadata: dict[str, Any] = field(default_factory=dict)  # token, class noun, training config, ...

    @property
    def single_part(self) -> bool:
        """Whether the version-1 layout holds it: one "unet" part, no tokens."""
        return set(self.parts) == {MAIN_PART} and not self.tokens


def write_adapter_file(file: AdapterFile) -> Path:
    """Write `file` atomically (to `file.path`), in the version-1 layout when it fits."""
    for name in file.parts:
        if name not in PARTS:
            raise UserError(f"cannot save a part named '{name}'; accepted: {', '.join(PARTS)}")
    for name in file.tokens:
        if name not in TEXT_PARTS:
            raise UserError(f"cannot save tokens for '{name}'; accepted: {', '.join(TEXT_PARTS)}")
    header = {"format": FORMAT, "base_model": file.base_model, "metadata": json.dumps(file.metadata, default=str)}
    if file.single_part:
        part = file.parts[MAIN_PART]
        flat = _flatten(part, "")
        header.update(
            format_version=str(SINGLE_PART_VERSION),
            method=part.method,
            config=json.dumps(part.config),
            layers=json.dumps(part.layers),
            num_trainable=str(part.num_trainable),
        )
    else:
        flat = {key: tensor for name, part in file.parts.items() for key, tensor in _flatten(part, f"{name}.").items()}
        for name, tokens in file.tokens.items():
            flat.update({f"{name}.{TOKEN_KEY}.{token}": vectors.detach().to("cpu").contiguous() for token, vectors in tokens.items()})
        header.update(
            format_version=str(FORMAT_VERSION),
            parts=json.dumps({name: part.header() for name, part in file.parts.items()}),
            tokens=json.dumps({name: list(tokens) for name, tokens in file.tokens.items()}),
            num_trainable=str(file.num_trainable),
        )
    with atomic_path(file.path) as tmp:
        save_file(flat, str(tmp), metadata=header)
    return file.path


def _flatten(part: AdapterPart, prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}{layer}.{name}": tensor.detach().to("cpu").contiguous()
        for layer, tensors in part.tensors.items()
        for name, tensor in tensors.items()
    }


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
    num_trainable = int(header["num_trainable"]) if header.get("num_trainable", "").isdigit() else 0
    if int(version) <= SINGLE_PART_VERSION:
        layers = _layers(path, _entry(path, header, "layers", dict), "")
        part = AdapterPart(
            method=_entry(path, header, "method", str),
            config=_entry(path, header, "config", dict),
            layers=layers,
            tensors=_split_keys(path, flat, layers, ""),
            num_trainable=num_trainable,
        )
        parts, tokens = {MAIN_PART: part}, {}
    else:
        parts, tokens = _read_parts(path, header, flat)
    return AdapterFile(
        path=path,
        parts=parts,
        tokens=tokens,
        base_model=header.get("base_model", ""),
        num_trainable=num_trainable,
        metadata=_entry(path, header, "metadata", dict, default="{}"),
    )


def _read_parts(
    path: Path, header: dict[str, str], flat: dict[str, torch.Tensor]
) -> tuple[dict[str, AdapterPart], dict[str, dict[str, torch.Tensor]]]:
    """The parts and tokens of a version-2 file: header entries checked, keys split by their part prefix."""
    listed = _entry(path, header, "parts", dict)
    token_names = _entry(path, header, "tokens", dict, default="{}")
    keys: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PARTS}
    for key, tensor in flat.items():
        name, _, rest = key.partition(".")
        if name not in PARTS:
            raise UserError(
                f"adapter file '{path}' holds tensor '{key}' of no part; expected '<part>.<key>' with part one of {', '.join(PARTS)}"
            )
        keys[name][rest] = tensor
    parts = {}
    for name, entry in listed.items():
        if name not in PARTS:
            raise UserError(f"adapter file '{path}' lists a part named '{name}'; accepted: {', '.join(PARTS)}")
        if not isinstance(entry, dict):
            raise UserError(f"adapter file '{path}': part '{name}' is {type(entry).__name__}; expected a JSON object")
        method, config, count = entry.get("method"), entry.get("config"), entry.get("num_trainable", 0)
        if not isinstance(method, str) or not isinstance(config, dict) or not isinstance(count, int):
            raise UserError(
                f"adapter file '{path}': part '{name}' needs a 'method' (text), a 'config' (object) and a 'num_trainable' (integer)"
            )
        layers = _layers(path, entry.get("layers"), f"part '{name}' ")
        mine = {key: tensor for key, tensor in keys[name].items() if not key.startswith(TOKEN_KEY + ".")}
        parts[name] = AdapterPart(method, config, layers, _split_keys(path, mine, layers, f"part '{name}': "), count)
    tokens = {}
    for name, listed_tokens in token_names.items():
        if name not in TEXT_PARTS:
            raise UserError(f"adapter file '{path}' lists tokens for '{name}'; accepted: {', '.join(TEXT_PARTS)}")
        if not (isinstance(listed_tokens, list) and all(isinstance(t, str) and t for t in listed_tokens)):
            raise UserError(f"adapter file '{path}': the tokens of '{name}' are {listed_tokens!r}; expected a list of non-empty strings")
        tokens[name] = {token: _token_vectors(path, keys[name], name, token) for token in listed_tokens}
    for name, rest in keys.items():
        for key in rest:
            if key.startswith(TOKEN_KEY + ".") and key[len(TOKEN_KEY) + 1 :] not in tokens.get(name, {}):
                raise UserError(f"adapter file '{path}' holds token vectors '{name}.{key}' not listed in its header")
            if not key.startswith(TOKEN_KEY + ".") and name not in parts:
                raise UserError(f"adapter file '{path}' holds tensor '{name}.{key}' of part '{name}', which its header does not list")
    return parts, tokens


def _token_vectors(path: Path, keys: dict[str, torch.Tensor], part: str, token: str) -> torch.Tensor:
    vectors = keys.get(f"{TOKEN_KEY}.{token}")
    where = f"token '{token}' of {part}"
    if vectors is None:
        raise UserError(f"adapter file '{path}' lists {where} but holds no vectors for it")
    if vectors.dim() != 2 or not vectors.is_floating_point() or 0 in vectors.shape:
        found = f"a {vectors.dtype} tensor of shape {tuple(vectors.shape)}"
        raise UserError(f"adapter file '{path}': {where} has {found}; expected float (n_vectors, width)")
    if not bool(torch.isfinite(vectors).all()):
        raise UserError(f"adapter file '{path}': {where} holds NaN or infinite values; the adapter is unusable")
    return vectors


def _layers(path: Path, layers: Any, where: str) -> dict[str, list[int]]:
    """The `layers` entry, checked: layer name -> weight shape (positive integers)."""
    if not isinstance(layers, dict):
        raise UserError(f"adapter file '{path}': {where}has no 'layers' object listing its layers")
    for name, shape in layers.items():
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise UserError(
                f"adapter file '{path}' {where}lists layer '{name}' with weight shape {shape!r}; expected a list of positive integers"
            )
    return layers


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


def _split_keys(path: Path, flat: dict[str, torch.Tensor], layers: dict[str, list[int]], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """`<layer>.<tensor>` keys grouped per layer (shared tensors under SHARED_KEY), each one finite."""
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    tensors[SHARED_KEY] = {}
    for key, tensor in flat.items():
        layer, _, name = key.rpartition(".")
        if key.startswith(SHARED_KEY + "."):
            layer, name = SHARED_KEY, key[len(SHARED_KEY) + 1 :]
        elif layer not in layers:
            raise UserError(
                f"adapter file '{path}' {where}holds tensor '{key}' of no layer listed in its header; "
                "expected '<layer>.<tensor>' for a listed layer"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            place = "the shared section" if layer == SHARED_KEY else f"layer '{layer}'"
            raise UserError(
                f"adapter file '{path}': {where}tensor '{name}' of {place} holds NaN or infinite values; "
                "the adapter is unusable (retrain it or use an earlier checkpoint)"
            )
        tensors[layer][name] = tensor
    return tensors


def adapter_info(path: str | Path) -> dict[str, Any]:
    """What an adapter file holds, without loading a model.

    `parts` has each part's method, config, layers and count; `tokens` each text part's tokens with
    their number of vectors. `method`, `config` and `layers` are the main part's (the UNet's, else the
    first part's; empty for a file of tokens only)."""
    file = read_adapter_file(path)
    main = file.parts.get(MAIN_PART) or next(iter(file.parts.values()), None)
    return {
        "method": main.method if main else "",
        "config": main.config if main else {},
        "layers": main.layers if main else {},
        "parts": {name: part.header() for name, part in file.parts.items()},
        "tokens": {name: {token: vectors.shape[0] for token, vectors in tokens.items()} for name, tokens in file.tokens.items()},
        "base_model": file.base_model,
        "num_trainable": file.num_trainable,
        "metadata": file.metadata,
        "file_size": file.path.stat().st_size,
    }


def saved_step(path: str | Path) -> int | None:
    """The step an adapter file was saved at (its metadata `steps`); None when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        step = adapter_info(path)["metadata"].get("steps")
    except UserError as exc:
        log.warning("cannot read the step of %s: %s", path, exc)
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
