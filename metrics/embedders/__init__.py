"""Image/text embedders behind one protocol: DINO, DINOv2, CLIP (open_clip), Inception, tiny stand-ins, and the shapes-world judge."""

from metrics.embedders.base import ImageEmbedder, ImageTextEmbedder
from metrics.embedders.registry import DEFAULT_SOURCES, default_embedders, load_embedder
from metrics.embedders.shapes import shapes_embedders
from metrics.embedders.tiny import tiny_embedders

__all__ = [
    "DEFAULT_SOURCES",
    "ImageEmbedder",
    "ImageTextEmbedder",
    "default_embedders",
    "load_embedder",
    "shapes_embedders",
    "tiny_embedders",
]
