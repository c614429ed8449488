"""Embedders by role and source: `load_embedder(name_or_path, kind)` and the default set used by `evaluate`."""

from __future__ import annotations

from functools import lru_cache

from metrics.embedders.base import ImageEmbedder
from metrics.embedders.clip import clip_embedder
from metrics.embedders.inception import INCEPTION_DEFAULT, inception_embedder
from metrics.embedders.vit import dino_embedder, dinov2_embedder

FACTORIES = {
    "dino": dino_embedder,
    "dinov2": dinov2_embedder,
    "clip": clip_embedder,
    "inception": inception_embedder,
}

DEFAULT_SOURCES = {
    "dino": "facebook/dino-vits16",
    "dinov2": "facebook/dinov2-small",
    "clip": "ViT-B-32",
    "inception": INCEPTION_DEFAULT,
}


@lru_cache(maxsize=None)
def load_embedder(name_or_path: str, kind: str, **options: object) -> ImageEmbedder:
    """The embedder of `kind` ("dino", "dinov2", "clip", "inception") from a hub id/model name or a local path.

    The same arguments return the same object, and its model loads on first use, once. A local
    path that does not exist raises FileNotFoundError naming it. Options go to the factory, e.g.
    `load_embedder("ViT-L-14", "clip")`, `load_embedder("ckpt.bin", "clip", architecture="ViT-B-32")`.
    """
    if kind not in FACTORIES:
        raise ValueError(f"unknown embedder kind {kind!r}; accepted: {', '.join(FACTORIES)}")
    return FACTORIES[kind](name_or_path, **options)


def default_embedders() -> dict[str, ImageEmbedder]:
    """The backbones of METRICS.md, one per role; nothing is downloaded until an embedder is used."""
    return {kind: load_embedder(source, kind) for kind, source in DEFAULT_SOURCES.items()}
