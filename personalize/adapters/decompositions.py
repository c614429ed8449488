"""Decompositions of base-model weights, cached on disk: the second attach reads instead of computing.

SVFit's SVD, LoLDU's LU and FRoD's joint basis depend only on the base weights (and a method option
or two), yet cost seconds to minutes per model (on SD 1.5's attention, 2-core CPU: SVFit's SVDs 20 s,
FRoD's joint decomposition 19 s, LoLDU's LU 2.4 s). The atoms' singular bases are not cached: they
come from one Gram matmul over the weight, which costs what hashing the weight costs (SD 1.5's 3x3
convs: 1.29 s to compute, 1.33 s to hash). `cached` keeps each
result as one safetensors file under `<cache>/decompositions/`, named by the kind, the settings and
a SHA-256 of the weights it came from (their bytes, dtype and shape); the file also states those in
its metadata. An entry is used only when that metadata matches and every expected tensor is there,
finite, with the shape recorded at write time; anything else is ignored and rewritten (never trusted).
A warm attach is bit for bit the cold one: the stored tensors are the computed ones.

Modes (`PERSONALIZE_DECOMPOSITIONS` or `decomposition_cache()`): `use` (default: read, else compute
and write), `refresh` (compute and write; the benchmark's cold attach), `off` (compute only).
Size: SVFit stores U, s and V^T (about twice the adapted weights in float32: 0.75 GB for SD 1.5's
attention), the others far less. The folder is capped at `PERSONALIZE_DECOMPOSITIONS_GB` (default
20), least recently used files first out; `personalize cache --clear decompositions` empties it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..cache import cache_dir
from ..errors import UserError
from ..modes import Mode

log = logging.getLogger(__name__)

MODES = ("use", "refresh", "off")
ENV = "PERSONALIZE_DECOMPOSITIONS"
SIZE_ENV = "PERSONALIZE_DECOMPOSITIONS_GB"
DEFAULT_GB = 20.0
FORMAT = "personalize.decomposition/1"

CACHE_MODE = Mode(ENV, MODES, "use", "decomposition cache mode")
cache_mode = CACHE_MODE.get
decomposition_cache = CACHE_MODE.using  # use the cache in a mode ("use", "refresh" or "off") inside a block


def weights_digest(weights: list[torch.Tensor]) -> str:
    """SHA-256 over each weight's dtype, shape and bytes (about 1.7 GB/s on one CPU core)."""
    digest = sha256()
    for weight in weights:
        flat = weight.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{flat.dtype} {tuple(weight.shape)};".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def cached(
    kind: str,
    settings: dict[str, object],
    weights: list[torch.Tensor],
    compute: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """`compute()` for `weights`, or the stored result of an earlier call with the same kind, settings
    and weight bytes; tensors come back on the first weight's device (stored on the CPU)."""
    mode = cache_mode()
    if mode == "off":
        return compute()
    path, meta = _entry(kind, settings, weights)
    stored = _read(path, meta) if mode == "use" else None
    if stored is not None:
        return {name: tensor.to(weights[0].device) for name, tensor in stored.items()}
    result = compute()
    _write(path, meta, result)
    return result


def find(kind: str, settings: dict[str, object], weights: list[torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The stored result for `weights` (see `cached`), or None; nothing is computed."""
    if cache_mode() != "use":
        return None
    path, meta = _entry(kind, settings, weights)
    stored = _read(path, meta)
    return None if stored is None else {name: tensor.to(weights[0].device) for name, tensor in stored.items()}


def _entry(kind: str, settings: dict[str, object], weights: list[torch.Tensor]) -> tuple[Path, dict[str, str]]:
    meta = {"format": FORMAT, "kind": kind, "settings": json.dumps(settings, sort_keys=True), "weights": weights_digest(weights)}
    name = f"{kind}-{sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]}.safetensors"
    return cache_dir("decompositions") / name, meta


def _read(path: Path, meta: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The entry at `path` if it is intact and made for `meta`, else None (and it will be rewritten)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored_meta = handle.metadata() or {}
        shapes = json.loads(stored_meta.get("shapes", "null"))
        if any(stored_meta.get(key) != value for key, value in meta.items()) or not isinstance(shapes, dict):
            raise ValueError("made for other weights or settings")
        tensors = load_file(str(path))
        if set(tensors) != set(shapes) or any(list(t.shape) != shapes[n] for n, t in tensors.items()):
            raise ValueError("tensors missing or of the wrong shape")
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
            raise ValueError("non-finite values")
    except (OSError, ValueError, SafetensorError) as exc:
        log.warning("ignoring the decomposition cache entry %s (%s); it will be recomputed", path.name, exc)
        return None
    os.utime(path)  # recently used: last to be evicted
    return tensors


def _write(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    try:
        with atomic_path(path) as tmp:
            save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp), {**meta, "shapes": json.dumps(shapes)})
        _evict(path.parent, keep=path)
    except OSError as exc:  # a full or read-only disk costs the next attach its decomposition, nothing else
        log.warning("cannot write the decomposition cache (%s); the next attach computes it again", exc)


def _evict(folder: Path, keep: Path) -> None:
    """Delete the least recently used entries while the folder is larger than its cap."""
    try:
        limit = float(os.environ.get(SIZE_ENV) or DEFAULT_GB) * 1e9
    except ValueError as exc:
        raise UserError(f"{SIZE_ENV} must be a number of gigabytes, got {os.environ.get(SIZE_ENV)!r}") from exc
    files = sorted((p for p in folder.glob("*.safetensors") if p != keep), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files) + keep.stat().st_size
    for old in files:
        if total <= limit:
            break
        total -= old.stat().st_size
        old.unlink(missing_ok=True)
