"""Inception embedder for FID/KID: torchmetrics' FID feature extractor (torch-fidelity InceptionV3, 2048-d pool)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from metrics.embedders.base import batches, default_device, log_loading

INCEPTION_DEFAULT = "inception-v3-compat"


class InceptionEmbedder:
    """Raw (not normalised) features of a network that takes uint8 (n, 3, S, S) images.

    Images are resized to `image_size` x `image_size` (PIL bilinear) so that a batch stacks.
    """

    def __init__(
        self,
        name: str,
        load: Callable[[], torch.nn.Module],
        dim: int,
        image_size: int = 299,
        batch_size: int = 32,
        device: torch.device | None = None,
    ) -> None:
        self.name = name
        self.dim = dim
        self._load = load
        self._image_size = image_size
        self._batch_size = batch_size
        self._device = device or default_device()

    @cached_property
    def _model(self) -> torch.nn.Module:
        log_loading("inception", self.name, self._device)
        return self._load().eval().to(self._device)

    @property
    def preprocessing(self) -> str:
        size = self._image_size
        return (
            f"RGB, resize to {size}x{size} (PIL bilinear), uint8 [0, 255] given to the network "
            f"(which maps it to [-1, 1]); feature: {self.dim}-d pool features, not normalised"
        )

    def _to_uint8(self, image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize((self._image_size, self._image_size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)  # (3, S, S) uint8

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for batch in batches(images, self._batch_size, f"{self.name} images"):
            pixels = torch.stack([self._to_uint8(im) for im in batch])  # (b, 3, S, S) uint8
            chunks.append(self._model(pixels.to(self._device)).double().cpu())  # (b, dim)
        return torch.cat(chunks)  # (n, dim)


def inception_embedder(source: str = INCEPTION_DEFAULT, **options: object) -> InceptionEmbedder:
    """FID InceptionV3 with torch-fidelity's weights (downloaded once), or a local .pth weights file."""
    weights = None
    if source != INCEPTION_DEFAULT:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {path} (give a torch-fidelity .pth file or {INCEPTION_DEFAULT!r})")
        weights = str(path)

    def load() -> torch.nn.Module:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name=INCEPTION_DEFAULT, features_list=["2048"], feature_extractor_weights_path=weights)

    name = f"torch-fidelity InceptionV3 FID weights ({weights or 'default download'})"
    return InceptionEmbedder(name, load, dim=2048, **options)
