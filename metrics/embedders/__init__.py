"""Image/text embedders behind one protocol: DINO, DINOv2, CLIP (open_clip), Inception, and tiny stand-ins."""

from metrics.embedders.base import ImageEmbedder, ImageTextEmbedder
from metrics.embedders.registry import DEFAULT_SOURCES, default_embedders, load_embedder
from metrics.embedders.tiny import tiny_embedders

__all__ = [
    "DEFAULT_SOURCES",
    "ImageEmbedder",
    "ImageTextEmbedder",
    "default_embedders",
    "load_embedder",
    "tiny_embedders",
]
