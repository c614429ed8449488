"""The cache folder: what the project keeps between runs, how big it is, and how to clear it.

Everything in it can be recomputed; nothing is trusted without a check (each kind validates its
entries and rewrites a bad one). Kinds:
- `class_images`: generated prior-preservation images, per (model, class prompt, size) (training/prior.py);
- `decompositions`: SVD / LU / joint bases of base-model weights, per hash of those weights (adapters/decompositions.py);
- `forms`: the measured fastest forward form of each adapted layer shape, per machine (adapters/forms.py).

`personalize cache` shows the sizes; `personalize cache --clear [KIND]` deletes them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError

KINDS = ("class_images", "decompositions", "forms")


def cache_root() -> Path:
    """$PERSONALIZE_CACHE, else $XDG_CACHE_HOME/personalize, else ~/.cache/personalize."""
    if os.environ.get("PERSONALIZE_CACHE"):
        return Path(os.environ["PERSONALIZE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "personalize"


def cache_dir(kind: str) -> Path:
    if kind not in KINDS:
        raise UserError(f"unknown cache kind '{kind}'; accepted: {', '.join(KINDS)}")
    return cache_root() / kind


def usage() -> dict[str, tuple[int, int]]:
    """(files, bytes) per kind."""
    result = {}
    for kind in KINDS:
        files = [p for p in cache_dir(kind).rglob("*") if p.is_file()] if cache_dir(kind).is_dir() else []
        result[kind] = (len(files), sum(p.stat().st_size for p in files))
    return result


def clear(kinds: tuple[str, ...] = KINDS) -> tuple[int, int]:
    """Delete the given kinds' folders; returns the (files, bytes) removed."""
    before = usage()
    for kind in kinds:
        folder = cache_dir(kind)
        if folder.is_dir():
            try:
                shutil.rmtree(folder)
            except OSError as exc:
                raise UserError(f"cannot clear the cache folder '{folder}': {exc.strerror or exc}") from exc
    return sum(before[k][0] for k in kinds), sum(before[k][1] for k in kinds)
