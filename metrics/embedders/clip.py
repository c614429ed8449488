"""CLIP embedder on open_clip: L2-normalised image and text embeddings in one space (CLIP-I, CLIP-T)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from metrics.embedders.base import batches, default_device, is_local_source, log_loading

ModelTransformTokenizer = tuple[torch.nn.Module, Callable, Callable]


def describe_open_clip_preprocess(preprocess_cfg: dict) -> str:
    """One line naming open_clip's evaluation transform from the model's preprocess config."""
    size = preprocess_cfg["size"]
    return (
        f"open_clip eval transform: RGB, resize ({preprocess_cfg['resize_mode']} side) to {size} "
        f"({preprocess_cfg['interpolation']}), center crop {size}, scale to [0, 1], "
        f"normalize mean={list(preprocess_cfg['mean'])} std={list(preprocess_cfg['std'])}; "
        "feature: projected image/text embedding, L2-normalised"
    )


class ClipEmbedder:
    """open_clip model, transform and tokenizer, loaded on first use, once."""

    def __init__(
        self,
        name: str,
        load: Callable[[], ModelTransformTokenizer],
        batch_size: int = 32,
        device: torch.device | None = None,
    ) -> None:
        self.name = name
        self._load = load
        self._batch_size = batch_size
        self._device = device or default_device()

    @cached_property
    def _bundle(self) -> ModelTransformTokenizer:
        log_loading("clip", self.name, self._device)
        model, transform, tokenizer = self._load()
        return model.eval().to(self._device), transform, tokenizer

    @property
    def dim(self) -> int:
        return int(self._bundle[0].visual.output_dim)

    @property
    def preprocessing(self) -> str:
        return describe_open_clip_preprocess(self._bundle[0].visual.preprocess_cfg)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        model, transform, _ = self._bundle
        chunks = []
        for batch in batches(images, self._batch_size, f"{self.name} images"):
            pixels = torch.stack([transform(im.convert("RGB")) for im in batch])  # (b, 3, S, S)
            chunks.append(model.encode_image(pixels.to(self._device), normalize=True).float().cpu())  # (b, d)
        return torch.cat(chunks)  # (n, d)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        model, _, tokenizer = self._bundle
        chunks = []
        for batch in batches(texts, self._batch_size, f"{self.name} texts"):
            tokens = tokenizer(list(batch))  # (b, context_length)
            chunks.append(model.encode_text(tokens.to(self._device), normalize=True).float().cpu())  # (b, d)
        return torch.cat(chunks)  # (n, d)


def clip_embedder(
    source: str = "ViT-B-32",
    pretrained: str = "openai",
    architecture: str = "ViT-B-32",
    quick_gelu: bool | None = None,
    **options: object,
) -> ClipEmbedder:
    """open_clip CLIP from an architecture name + pretrained tag, a local checkpoint file, or a folder.

    - `source="ViT-L-14"` (any open_clip name or "hf-hub:org/repo"): weights of tag `pretrained`.
    - a checkpoint file: built as `architecture`; open_clip skips its QuickGELU check for files, so
      `quick_gelu` defaults to True (OpenAI weights); pass False for LAION-style checkpoints.
    - a folder with open_clip_config.json and weights (open_clip's "local-dir:" layout).
    For tag "openai", QuickGELU is forced too (the plain ViT-B-32 config uses GELU).
    """
    local = is_local_source(source)
    path = Path(source).expanduser()
    if local and path.is_dir():
        model_name, weights, arch = f"local-dir:{path}", None, f"local-dir:{path}"
        force_quick_gelu = bool(quick_gelu)
        name = str(path)
    elif local:
        model_name, weights, arch = architecture, str(path), architecture
        force_quick_gelu = True if quick_gelu is None else quick_gelu
        name = f"open_clip {architecture} ({path})"
    else:
        model_name, weights, arch = source, pretrained, source
        force_quick_gelu = (pretrained == "openai") if quick_gelu is None else quick_gelu
        name = f"open_clip {source} ({pretrained})"
    if force_quick_gelu:
        name += " QuickGELU"

    def load() -> ModelTransformTokenizer:
        import open_clip

        try:
            model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=weights, force_quick_gelu=force_quick_gelu)
        except RuntimeError as err:
            raise OSError(f"could not load open_clip model {source!r}: {err}") from err
        return model, transform, open_clip.get_tokenizer(arch)

    return ClipEmbedder(name, load, **options)
