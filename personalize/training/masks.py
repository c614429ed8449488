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
from ..errors import UserError

log = logging.getLogger(__name__)

SHOWN = 5  # empty masks named in a message (then "and N more")


def mask_files(files: Sequence[str], mode: str) -> dict[str, Image.Image]:
    """`{image file: mask}` (8-bit, the image's size) read from `<image>.mask.png` (none with mode 'off').
    Cheap and checked before any model loads: an unreadable mask fails the run at once, naming the file."""
    if mode == "off":
        return {}
    return {f: load_mask(mask_file(f), load_image(f, min_side=1).size) for f in files if mask_file(f).is_file()}


def check_masks(files: Sequence[str], masks: dict[str, Image.Image], background_weight: float) -> None:
    """Masks without any subject (all black): refused when every photo has one and the background weight
    is 0 (nothing would train), otherwise a warning naming them; logs how many photos train masked."""
    if not masks:
        return
    empty = [f for f in files if f in masks and masks[f].getextrema()[1] == 0]
    if empty:
        shown = ", ".join(_mask_name(f) for f in empty[:SHOWN]) + (f" and {len(empty) - SHOWN} more" if len(empty) > SHOWN else "")
        if background_weight == 0 and len(empty) == len(files):
            raise UserError(
                f"every mask is empty (all black: no subject), so with mask_background_weight 0 nothing would train: {shown}; "
                "paint the subject white, raise mask_background_weight, or set masks 'off'"
            )
        effect = "teach nothing" if background_weight == 0 else f"train only as background, at weight {background_weight:g}"
        log.warning("%d mask(s) are empty (all black: no subject): %s; those photos %s", len(empty), shown, effect)
    kept = len(masks) - len(empty)
    log.info("masked loss on %d of %d photo(s)%s", kept, len(files), f"; {len(empty)} with an empty mask" if empty else "")


def _mask_name(image: str) -> str:
    """The mask file of `image`, or (masks 'auto') where its mask came from."""
    return str(mask_file(image)) if mask_file(image).is_file() else f"the auto mask of {image}"


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
