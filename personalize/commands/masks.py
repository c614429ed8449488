"""`personalize masks`: write a loss mask next to each photo, made by a segmentation model, to inspect before training.

    personalize masks photos/ --class-noun dog

Writes `photo.mask.png` (white = subject) next to each `photo.jpg` that has no mask yet; `--overwrite`
replaces existing ones. Edit a mask in any paint program: training with masks 'files' reads it.
Every photo and folder is checked (decoded, written to) before the model loads: a bad one writes no mask.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, user_error_from_os
from ..training.config import TrainConfig

if TYPE_CHECKING:
    from PIL import Image

BATCH_SIZE = 4  # images decoded and segmented at once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="FOLDER_OR_FILES", help="a folder of photos, or photo files")
    parser.add_argument("--class-noun", required=True, help="what the subject is (the segmentation prompt): dog, person, mug")
    parser.add_argument(
        "--mask-model",
        default=TrainConfig.mask_model,
        metavar="ID",
        help=f"CLIPSeg hub id or local folder, or 'tiny' (random weights, for tests); default {TrainConfig.mask_model}",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace masks that already exist (default: keep them)")
    parser.add_argument("--device", default=None, help="where to run the model (default: cuda, then mps, then cpu)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..automask import auto_masks, load_segmenter
    from ..data import MASK_SUFFIX, MIN_RESOLUTION, is_mask_file, list_image_files, load_image, mask_file
    from ..models import resolve_device

    noun = " ".join(args.class_noun.split())
    if not noun:
        raise UserError("--class-noun is empty; give what the subject is, e.g. --class-noun dog")
    files = [f for f in list_image_files(args.images, "images") if not is_mask_file(f)]
    if not files:
        raise UserError(f"only mask files ({MASK_SUFFIX}) given; pass the photos or their folder")
    todo = [f for f in files if args.overwrite or not mask_file(f).exists()]
    kept = len(files) - len(todo)
    if not todo:
        print(f"all {len(files)} image(s) already have a mask; --overwrite replaces them")
        return 0
    device = resolve_device(args.device)  # an unknown or missing device is refused before any image is decoded
    check_inputs(todo)
    segmenter = load_segmenter(args.mask_model, device)
    with tqdm(total=len(todo), desc="masks", unit="img") as bar:
        for start in range(0, len(todo), BATCH_SIZE):
            batch = todo[start : start + BATCH_SIZE]
            masks = auto_masks([load_image(f, MIN_RESOLUTION) for f in batch], noun, segmenter, batch_size=BATCH_SIZE)
            for file, mask in zip(batch, masks):
                write_mask(file, mask)
            bar.update(len(batch))
    skipped = f"; kept {kept} existing mask(s) (--overwrite replaces them)" if kept else ""
    print(f"wrote {len(todo)} mask(s) next to the images (white = {noun}){skipped}")
    return 0


def check_inputs(images: list[Path]) -> None:
    """Before the model loads: every folder of `images` takes a new file and every image decodes; a
    failure is one UserError naming the folder or the image(s), and no mask is written."""
    from ..atomic import make_writable_dir
    from ..data import MIN_RESOLUTION, validate_instance_images

    for folder in dict.fromkeys(image.parent for image in images):
        make_writable_dir(folder, "mask folder")
    validate_instance_images(images, MIN_RESOLUTION, "images")


def write_mask(image: Path, mask: Image.Image) -> None:
    """`mask` as `<image>.mask.png`, atomically."""
    from ..atomic import atomic_path
    from ..data import mask_file

    try:
        with atomic_path(mask_file(image)) as tmp:
            mask.save(tmp, format="PNG")
    except OSError as exc:
        raise user_error_from_os(exc, "mask") from exc
