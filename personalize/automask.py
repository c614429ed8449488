"""Automatic loss masks: a text-prompted segmentation model marks the subject in each photo.

The model is CLIPSeg (Lüddecke & Ecker 2022; default `CIDAS/clipseg-rd64-refined`, 150M parameters, about
600 MB), prompted with the class noun ("dog"). It predicts one logit per pixel of a 352 px grid; the mask
is made as OneTrainer's ClipSeg masking makes it (`modules/module/ClipSegModel.py`, its defaults): sigmoid,
a box blur, the threshold 0.3, then the region grown so the subject's edges stay inside (the blur and growth
are scaled to the grid here: 5 and 7 px at 352). The binary mask is upsampled bilinearly to the photo's
size, so its edge is soft over a few pixels. Output: mode "L" images, white = subject, black = background,
the size of each photo.

Cost: one CLIPSeg pass (a ViT-B/16) per photo at 352 px, about a second on a CPU, milliseconds on a GPU;
the first use downloads the model. `tiny` is a random CLIPSeg for tests: offline, its masks mean nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UserError

TINY = "tiny"
TINY_SEED = 0
TINY_IMAGE_SIZE = 64
THRESHOLD = 0.3  # OneTrainer's default: CLIPSeg's probabilities are low, 0.5 cuts into the subject
SMOOTH_FRACTION = 1 / 70  # box-blur radius per grid side: OneTrainer's 5 px at 352
GROW_FRACTION = 1 / 50  # dilation radius per grid side: about OneTrainer's 10 px at 512 px photos
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # the normalisation of CIDAS/clipseg-rd64-refined's preprocessor_config.json
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class Segmenter:
    """A CLIPSeg model and its processor on one device."""

    name: str
    model: torch.nn.Module
    processor: Callable
    device: torch.device


def load_segmenter(name: str, device: str | torch.device | None = None) -> Segmenter:
    """The CLIPSeg named `name` (hub id, local folder, or 'tiny') on `device` (default: CUDA, MPS, CPU);
    the last one loaded is kept for the next call. A model that cannot be loaded is a one-line UserError."""
    from .models import resolve_device

    return _load(str(name).strip(), resolve_device(device))


@functools.lru_cache(maxsize=1)
def _load(name: str, device: torch.device) -> Segmenter:
    model, processor = _build_tiny() if name == TINY else _from_pretrained(name)
    return Segmenter(name, model.eval().requires_grad_(False).to(device), processor, device)


def _from_pretrained(name: str) -> tuple[torch.nn.Module, Callable]:
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    try:
        return CLIPSegForImageSegmentation.from_pretrained(name), CLIPSegProcessor.from_pretrained(name)
    except Exception as exc:  # hub, network and format errors all end here with one clear line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"segmentation model '{name}' cannot be loaded ({reason}): check the id or network, give a local CLIPSeg folder, "
            "or use masks 'files'"
        ) from exc


def _build_tiny() -> tuple[torch.nn.Module, Callable]:
    """A random CLIPSeg with layers 32-64 wide, 64 px input, and the project's CLIP tokenizer: offline, seed 0."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from .models import clip_tokenizer

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text.update(max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    vision.update(image_size=TINY_IMAGE_SIZE, patch_size=8)
    config = CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=32,
        extract_layers=[1, 2],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIPSegForImageSegmentation(config)
    images = ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return model, CLIPSegProcessor(image_processor=images, tokenizer=clip_tokenizer())


def auto_masks(
    images: Sequence[Image.Image],
    prompt: str,
    segmenter: Segmenter,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """One mask per image (mode "L", the image's size, white = `prompt`'s subject); `progress(done, total)`
    after each batch of `batch_size` images."""
    masks: list[Image.Image] = []
    for start in range(0, len(images), batch_size):
        batch = [image.convert("RGB") for image in images[start : start + batch_size]]
        probabilities = _probabilities(batch, prompt, segmenter)  # (b, grid, grid)
        masks += [_to_mask(p, image.size) for p, image in zip(probabilities, batch)]
        if progress is not None:
            progress(len(masks), len(images))
    return masks


@torch.no_grad()
def _probabilities(batch: list[Image.Image], prompt: str, segmenter: Segmenter) -> torch.Tensor:
    inputs = segmenter.processor(text=[prompt] * len(batch), images=batch, padding=True, return_tensors="pt")
    logits = segmenter.model(**{k: v.to(segmenter.device) for k, v in inputs.items()}).logits  # (b, grid, grid)
    return torch.sigmoid(logits.float().reshape(len(batch), *logits.shape[-2:])).cpu()


def _to_mask(probability: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """(grid, grid) probabilities -> a mask of `size` (width, height): blur, threshold, grow, upsample."""
    grid = probability[None, None]  # (1, 1, grid, grid)
    smooth = max(1, round(grid.shape[-1] * SMOOTH_FRACTION))
    grow = max(1, round(grid.shape[-1] * GROW_FRACTION))
    grid = F.avg_pool2d(F.pad(grid, [smooth] * 4, mode="replicate"), 2 * smooth + 1, stride=1)
    grid = (grid > THRESHOLD).float()
    grid = F.max_pool2d(grid, 2 * grow + 1, stride=1, padding=grow)
    width, height = size
    full = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0]  # (H, W)
    return Image.fromarray((full * 255).round().clamp(0, 255).to(torch.uint8).numpy())
