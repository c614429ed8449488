"""Loss masks: which pixels of each instance photo teach the subject, and the loss they weight.

A mask comes from `<image>.mask.png` next to the photo (white = subject) or, with `masks = "auto"`,
from a segmentation model prompted with the class noun for the photos without a file. The mask
goes through the photo's own resize and crop and is averaged down to the latent grid, so latent
pixel (i, j) is weighted by the share of subject pixels it covers:

    w = m + background_weight * (1 - m)                      m in [0, 1], (b, 1, h, w)
    error_k = sum_(c,i,j) w * (prediction - target)^2 / sum_(c,i,j) w

(`objective.Batch.pixel_weights` and `objective.per_sample_mse`).

Normalising by the weights keeps the loss on the scale of the unmasked mean (a small subject does
not train at a lower effective learning rate); photos without a mask have w = 1 everywhere, which
gives the plain mean. kohya sd-scripts (`--masked_loss`) and OneTrainer weight the loss the same
way; OneTrainer's "unmasked weight" 0.1 is our default background weight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from ..data import load_image, load_mask, mask_file

log = logging.getLogger(__name__)


def mask_files(files: Sequence[str], mode: str) -> dict[str, Image.Image]:
    """`{image file: mask}` (8-bit, the image's size) read from `<image>.mask.png` (none with mode 'off').
    Cheap and checked before any model loads: an unreadable mask fails the run at once, naming the file."""
    if mode == "off":
        return {}
    return {f: load_mask(mask_file(f), load_image(f, min_side=1).size) for f in files if mask_file(f).is_file()}


def auto_masks_for(
    files: Sequence[str],
    masks: dict[str, Image.Image],
    class_noun: str,
    mask_model: str,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Image.Image]:
    """`masks` completed with a segmentation (prompted with `class_noun`) of the photos that have none."""
    missing = [f for f in files if f not in masks]
    if not missing:
        return masks
    from ..automask import auto_masks, load_segmenter

    log.info("masking %d photo(s) with %s prompted with '%s'", len(missing), mask_model, class_noun)
    segmenter = load_segmenter(mask_model, device)
    images = [load_image(f, min_side=1) for f in missing]
    return {**masks, **dict(zip(missing, auto_masks(images, class_noun, segmenter, progress=progress)))}
