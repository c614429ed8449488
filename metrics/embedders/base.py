"""The embedder protocol every metric consumes, plus device choice, batching and local-path checks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Protocol, Sequence, TypeVar, runtime_checkable

import torch
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

T = TypeVar("T")

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@runtime_checkable
class ImageEmbedder(Protocol):
    """Maps images to an (n, dim) floating-point CPU tensor; `name` and `preprocessing` go into reports."""

    name: str

    @property
    def dim(self) -> int: ...

    @property
    def preprocessing(self) -> str: ...

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


@runtime_checkable
class ImageTextEmbedder(ImageEmbedder, Protocol):
    """An image embedder with a text tower in the same space (CLIP)."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batches(items: Sequence[T], batch_size: int, desc: str) -> Iterator[Sequence[T]]:
    """Consecutive slices of `items` of at most `batch_size`, with a tqdm progress bar."""
    if not items:
        raise ValueError(f"{desc}: nothing to embed (got an empty list)")
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=None):
        yield items[start : start + batch_size]


def is_local_source(name_or_path: str) -> bool:
    """True when `name_or_path` names a local file or folder; a path-like name that is missing raises.

    Hub ids ("facebook/dino-vits16") and model names ("ViT-B-32") return False. Anything that looks
    like a path (absolute, ./ ../ ~, or a weight-file suffix) must exist: no silent download.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return True
    looks_like_path = (
        path.is_absolute() or name_or_path.startswith(("./", "../", "~", ".\\", "..\\")) or name_or_path.lower().endswith(WEIGHT_SUFFIXES)
    )
    if looks_like_path:
        raise FileNotFoundError(f"model file or folder not found: {path} (give an existing local path or a hub id)")
    return False


def log_loading(kind: str, source: str, device: torch.device) -> None:
    """One log line per model load (each embedder loads once)."""
    logger.info("loading %s embedder from %s on %s", kind, source, device)
