"""The `shapes` embedder set: the shapes-world judge (a CNN shipped with the built-in `shapes` model)
in every metric role, for images of that world (`personalize eval --embedders shapes`).

- "dino", "dinov2" (Vendi), "inception" (FID/KID): the judge's L2-normalised 128-d penultimate
  features, the analogue of DINO features;
- "clip": the judge's reading as concatenated one-hot vectors (shape, colour, pattern,
  background), so CLIP-I is the share of attributes two images agree on; its text side encodes
  the attributes a prompt names, and `agreement` makes CLIP-T the share of an image's prompt
  attributes that the judge sees (`matches / named`) instead of a cosine.

The judge lives with its world in `personalize.shapes.judge`; it is looked up by module name when
this set is asked for, the one place where `metrics` reaches into the `personalize` package (the
world and its judge are one unit; nothing in `personalize` imports `metrics`).
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from metrics.embedders.base import ImageEmbedder

JUDGE_MODULE = "personalize.shapes.judge"
PREPROCESSING = "RGB, bilinear resize to 32x32, scaled to [-1, 1]"


@cache
def _judge() -> ModuleType:
    return importlib.import_module(JUDGE_MODULE)


class JudgeFeatures:
    """Penultimate judge features: (n, 128), L2-normalised."""

    name = "shapes judge features (128-d)"
    preprocessing = PREPROCESSING
    dim = 128

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return _judge().embed(list(images)).cpu()


class JudgeReading:
    """The judge's attribute reading as one-hot vectors, with a text side for the same space."""

    name = "shapes judge attribute reading (one-hot)"
    preprocessing = PREPROCESSING

    def _offsets(self) -> tuple[dict[str, int], int]:
        offsets, total = {}, 0
        for name, values in _judge().ATTRIBUTES.items():
            offsets[name] = total
            total += len(values)
        return offsets, total

    @property
    def dim(self) -> int:
        return self._offsets()[1]

    def _encode(self, readings: Sequence[dict[str, str]]) -> torch.Tensor:
        vocab = _judge().ATTRIBUTES
        offsets, total = self._offsets()
        out = torch.zeros(len(readings), total)  # (n, sum of vocabulary sizes)
        for row, reading in enumerate(readings):
            for name, value in reading.items():
                out[row, offsets[name] + vocab[name].index(value)] = 1.0
        return out

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._encode(_judge().predict(list(images)))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Zero rows for prompts that name no attribute of the world."""
        return self._encode([_judge().prompt_attributes(t) for t in texts])

    @staticmethod
    def agreement(images: torch.Tensor, texts: torch.Tensor) -> np.ndarray:
        """Per row: attributes named in the prompt that the judge sees / attributes named; (n,)."""
        named = texts.sum(dim=1)  # (n,)
        matches = (images * texts).sum(dim=1)  # (n,)
        return (matches / named.clamp_min(1)).double().numpy()


def shapes_embedders() -> dict[str, ImageEmbedder]:
    """One judge-backed embedder per role ("dino", "dinov2", "clip", "inception")."""
    features = JudgeFeatures()
    return {"dino": features, "dinov2": features, "clip": JudgeReading(), "inception": features}
