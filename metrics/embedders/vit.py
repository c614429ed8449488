"""DINO and DINOv2 embedders: Hugging Face transformers ViT backbones, CLS features, L2-normalised."""

from __future__ import annotations

from functools import cached_property
from typing import Callable, Sequence

import torch
from PIL import Image

from metrics.embedders.base import batches, default_device, is_local_source, log_loading

ModelAndProcessor = tuple[torch.nn.Module, Callable]


def describe_image_processor(processor: Callable) -> str:
    """One line naming what a transformers image processor does to an image before the model."""
    config = processor.to_dict()
    steps = ["RGB"]
    if config.get("do_resize", True):
        resample = config.get("resample")
        steps.append(f"resize to {config.get('size')} ({getattr(resample, 'name', resample)})".lower())
    if config.get("do_center_crop"):
        steps.append(f"center crop {config.get('crop_size')}")
    if config.get("do_rescale", True):
        steps.append("scale to [0, 1]")
    if config.get("do_normalize", True):
        steps.append(f"normalize mean={list(config.get('image_mean'))} std={list(config.get('image_std'))}")
    return f"{config.get('image_processor_type', type(processor).__name__)}: " + ", ".join(steps)


class VitEmbedder:
    """CLS embedding of a transformers ViT-family model; the model is loaded on first use, once."""

    def __init__(
        self,
        name: str,
        load: Callable[[], ModelAndProcessor],
        pooled: bool,
        batch_size: int = 32,
        device: torch.device | None = None,
    ) -> None:
        self.name = name
        self._load = load
        self._pooled = pooled
        self._batch_size = batch_size
        self._device = device or default_device()

    @cached_property
    def _model_and_processor(self) -> ModelAndProcessor:
        log_loading("vit", self.name, self._device)
        model, processor = self._load()
        return model.eval().to(self._device), processor

    @property
    def dim(self) -> int:
        return int(self._model_and_processor[0].config.hidden_size)

    @property
    def preprocessing(self) -> str:
        feature = "pooled CLS (final layernorm)" if self._pooled else "CLS token of the last hidden state"
        return f"{describe_image_processor(self._model_and_processor[1])}; feature: {feature}, L2-normalised"

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        model, processor = self._model_and_processor
        chunks = []
        for batch in batches(images, self._batch_size, f"{self.name} images"):
            pixels = processor(images=[im.convert("RGB") for im in batch], return_tensors="pt")["pixel_values"]
            out = model(pixel_values=pixels.to(self._device))  # pixels: (b, 3, H, W)
            cls = out.pooler_output if self._pooled else out.last_hidden_state[:, 0]  # (b, hidden)
            chunks.append(torch.nn.functional.normalize(cls.float(), dim=-1).cpu())
        return torch.cat(chunks)  # (n, hidden)


def _from_pretrained(model_class: type, source: str, **kwargs: object) -> ModelAndProcessor:
    """Model and image processor from a local folder or a hub id, with a clear error when that fails."""
    from transformers import AutoImageProcessor

    try:
        return model_class.from_pretrained(source, **kwargs), AutoImageProcessor.from_pretrained(source)
    except OSError as err:
        raise OSError(
            f"could not load {model_class.__name__} from {source!r}: {str(err).rstrip('.')}. "
            "Give a local folder saved with save_pretrained, or a hub id while online."
        ) from err


def dino_embedder(source: str = "facebook/dino-vits16", **options: object) -> VitEmbedder:
    """DINO ViT (default ViT-S/16): CLS of the last hidden state, loaded WITHOUT the random pooler."""
    is_local_source(source)

    def load() -> ModelAndProcessor:
        from transformers import ViTModel

        return _from_pretrained(ViTModel, source, add_pooling_layer=False)

    return VitEmbedder(source, load, pooled=False, **options)


def dinov2_embedder(source: str = "facebook/dinov2-small", **options: object) -> VitEmbedder:
    """DINOv2 (default small): pooled CLS (layernormed CLS token)."""
    is_local_source(source)

    def load() -> ModelAndProcessor:
        from transformers import Dinov2Model

        return _from_pretrained(Dinov2Model, source)

    return VitEmbedder(source, load, pooled=True, **options)
