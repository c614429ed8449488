"""Instance and class images: validation where they enter, conversion to RGB, resize and crop.

Every image passes through `load_image`, which reads the header first (size limits, decompression-bomb
guard) and then decodes, applies the EXIF orientation, converts colour (ICC profiles, CMYK,
grayscale, 16-bit, transparency) to 8-bit sRGB, and names the file in every error. Input files
are only ever opened for reading.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
ACCEPTED = ", ".join(IMAGE_SUFFIXES)
MIN_SIDE = 64  # px: below this an image carries too little of the subject to learn from (and below one SD latent tile)
MIN_RESOLUTION = 32  # px: the smallest training / sampling size, the native size of the built-in `shapes`


def check_resolution(resolution: int | None) -> None:
    """UserError unless `resolution` is None (the model's native size) or a multiple of 8 >= MIN_RESOLUTION."""
    if resolution is not None and (resolution < MIN_RESOLUTION or resolution % 8):
        raise UserError(f"resolution must be a multiple of 8 of at least {MIN_RESOLUTION} px, got {resolution}")


MAX_PIXELS = 150_000_000  # above the largest camera sensors (150 MP); guards against decompression bombs (~450 MB decoded)
# DreamBooth learns a subject from 3-5 photos (Ruiz et al. 2023, §4.1). Far beyond that (more than 20)
# the paper-default steps see each photo only a few times and preparation takes longer: warn, train anyway.
MANY_IMAGES = 20
CAPTION_SUFFIX = ".txt"
# CLIP reads 77 tokens (about 300 characters); kohya-style tag lists run to a few hundred more. A caption is copied
# into the adapter's metadata, so a larger file (a log pasted by mistake) is refused rather than carried along.
MAX_CAPTION_BYTES = 2048
MASK_SUFFIX = ".mask.png"  # `photo.jpg` -> `photo.mask.png`: white = subject (masked loss)
BACKGROUND = (255, 255, 255)  # transparent pixels become white: cut-out product/subject photos are meant on white


def list_image_files(source: str | os.PathLike | Sequence[str | os.PathLike], what: str = "instance images") -> list[Path]:
    """The image files named by `source`: a folder (its image files, sorted), a file, or a list of those.

    In a folder, files without an image suffix (captions, notes) are skipped with a log message; a
    file given explicitly must be an image.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise UserError(f"no {what} given; pass a folder or a list of image files ({ACCEPTED})")
    files: list[Path] = []
    for entry in sources:
        path = Path(entry).expanduser()
        if path.is_dir():
            files += _images_in_folder(path, what)
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise UserError(f"{what}: '{path}' does not exist (expected a folder or image files: {ACCEPTED})")
    return files


def _images_in_folder(folder: Path, what: str) -> list[Path]:
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise UserError(f"{what}: cannot read folder '{folder}': {exc.strerror or exc}") from exc
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_mask_file(p)]
    companions = {caption_file(p) for p in images}
    skipped = [p.name for p in entries if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES and p not in companions]
    if skipped:
        log.info("%s: skipping %d non-image file(s) in %s: %s", what, len(skipped), folder, ", ".join(skipped[:5]))
    if not images:
        raise UserError(f"no {what} found in folder '{folder}'; accepted files: {ACCEPTED}")
    return images


def caption_file(image: str | os.PathLike) -> Path:
    """Where an image's caption lives: the same name with `.txt` (kohya sd-scripts' default extension)."""
    return Path(image).with_suffix(CAPTION_SUFFIX)


def mask_file(image: str | os.PathLike) -> Path:
    """Where an image's loss mask lives: `photo.jpg` -> `photo.mask.png` in the same folder."""
    path = Path(image)
    return path.with_name(path.stem + MASK_SUFFIX)


def is_mask_file(path: str | os.PathLike) -> bool:
    """A `*.mask.png` file: another image's mask, never an instance image of its own in a folder."""
    return Path(path).name.lower().endswith(MASK_SUFFIX)


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> Image.Image:
    """The mask at `path` as an 8-bit grayscale image of `size` (width, height): white = subject.

    Colour masks become grayscale; a mask with transparency uses its alpha channel (painted = subject)
    when the alpha carries information, and its luminance when the alpha is fully opaque (editors save
    black-and-white masks as RGBA); a mask of another size than its image is resized to it (logged).
    Unreadable files are a UserError naming the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                mask = ImageOps.exif_transpose(opened)
    except FileNotFoundError as exc:
        raise UserError(f"mask '{path}' does not exist") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"mask '{path}' cannot be read as an image ({exc}); save it as a black-and-white PNG") from exc
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        alpha = rgba.getchannel("A")
        mask = alpha if alpha.getextrema() != (255, 255) else rgba.convert("RGB")  # opaque alpha: the grey levels tell
    elif mask.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        mask = _to_8bit(mask)
    mask = mask.convert("L")
    if mask.size != tuple(size):
        log.info("resizing mask %s from %dx%d to its image's %dx%d px", path.name, *mask.size, *size)
        mask = mask.resize(tuple(size), Image.Resampling.BILINEAR)
    return mask


def read_captions(images: Sequence[str | os.PathLike]) -> dict[str, str]:
    """`{image: caption}` for the images that have a non-empty `<image>.txt` (whitespace collapsed);
    a caption that cannot be read, is not UTF-8 text or is over MAX_CAPTION_BYTES is a UserError naming the file."""
    captions = {}
    for image in images:
        path = caption_file(image)
        if not path.is_file():
            continue
        try:
            size = path.stat().st_size
            if size > MAX_CAPTION_BYTES:
                raise UserError(
                    f"caption file '{path}' is {size:,} bytes; at most {MAX_CAPTION_BYTES:,} are accepted "
                    "(the text encoder reads about 300 characters): shorten it"
                )
            text = " ".join(path.read_text(encoding="utf-8-sig").split())
        except UnicodeDecodeError as exc:
            raise UserError(f"caption file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except OSError as exc:
            raise UserError(f"cannot read caption file '{path}': {exc.strerror or exc}") from exc
        if text:
            captions[str(image)] = text
    return captions


def validate_instance_images(
    paths: str | os.PathLike | Sequence[str | os.PathLike], min_side: int = MIN_SIDE, what: str = "instance images"
) -> list[str]:
    """Check that every image can be used for training (each side at least `min_side` px); returns the
    image files as strings.

    Raises one UserError naming every bad file and why (missing, unreadable, not an image, corrupt,
    too small, too large), so one attempt shows all that needs fixing.
    """
    files = list_image_files(paths, what)
    problems = []
    for file in files:
        try:
            load_image(file, min_side)
        except UserError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} of {len(files)} {what} cannot be used: " + "; ".join(problems))
    return [str(f) for f in files]


def many_images_note(count: int) -> str | None:
    """A one-line warning when `count` instance images are far more than DreamBooth expects, else None."""
    if count <= MANY_IMAGES:
        return None
    return (
        f"{count} instance images: DreamBooth expects 3-5 photos of one subject (more than {MANY_IMAGES} is unusual); "
        "training goes on, but each photo is seen only about steps/images times, so consider more steps "
        "or fewer, more varied photos"
    )


def load_image(path: str | os.PathLike, min_side: int = MIN_SIDE) -> Image.Image:
    """Decode `path` into an 8-bit sRGB image, upright (EXIF orientation applied); each side must be
    at least `min_side` px (training passes the smaller of MIN_SIDE and its resolution, so a 32 px
    model such as `shapes` can learn from its own 32 px class images)."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError as exc:
        raise UserError(f"image '{path}' does not exist") from exc
    except IsADirectoryError as exc:
        raise UserError(f"'{path}' is a folder, not an image file ({ACCEPTED})") from exc
    except OSError as exc:
        raise UserError(f"image '{path}' cannot be read: {exc.strerror or exc}") from exc
    with handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is checked below
        try:
            image = Image.open(handle)  # reads the header only
        except Image.DecompressionBombError as exc:
            raise _too_large(path, None) from exc
        except UnidentifiedImageError as exc:
            raise UserError(f"'{path}' is not an image file that can be read; accepted: {ACCEPTED}") from exc
        except OSError as exc:
            raise UserError(f"image '{path}' cannot be read: {exc.strerror or exc}") from exc
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise _too_large(path, image.size)
        if min(width, height) < min_side:
            raise UserError(f"image '{path}' is {width}x{height} px; each side must be at least {min_side} px")
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise _too_large(path, image.size) from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise UserError(f"image '{path}' is corrupt or truncated ({exc}); re-export it as PNG or JPEG") from exc
    return to_rgb(image)


def _too_large(path: Path, size: tuple[int, int] | None) -> UserError:
    dims = f" ({size[0]}x{size[1]} px)" if size else ""
    return UserError(
        f"image '{path}' is too large{dims}; at most {MAX_PIXELS / 1e6:.0f} megapixels are accepted "
        "(decompression-bomb guard): downscale it first"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB in sRGB: EXIF orientation, ICC profile, 16-bit depth, CMYK and alpha handled."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    icc = image.info.get("icc_profile")
    if icc and image.mode in ("RGB", "RGBA", "CMYK", "L"):
        image = _to_srgb(image, icc)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale to 8 bits (16-bit range mapped to 0..255)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    else:
        top = 65535.0 if values.max(initial=0.0) > 255 else 255.0
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def _to_srgb(image: Image.Image, icc: bytes) -> Image.Image:
    """Convert from the embedded colour profile (Display P3 phone photos, print CMYK) to sRGB."""
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    source = image.convert("RGB") if image.mode == "RGBA" else image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(source, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        log.debug("ignoring unusable ICC profile: %s", exc)
        return image
    if converted is None:  # profileToProfile returns None only with inPlace=True
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def cover_crop(width: int, height: int, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where `fit_crop` cuts a `width` x `height` image for a target `size` (width, height): the resized
    (width, height) that covers the target, and the centred crop's (left, top) in it, px."""
    target_width, target_height = size
    factor = max(target_width / width, target_height / height)
    resized = (max(target_width, round(width * factor)), max(target_height, round(height * factor)))
    return resized, ((resized[0] - target_width) // 2, (resized[1] - target_height) // 2)


def fit_crop(image: Image.Image, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize until the image covers `size` (width, height), then crop its centre to it."""
    width, height = image.size
    resized, (left, top) = cover_crop(width, height, size)
    if resized[0] > width or resized[1] > height:
        log.info("upscaling a %dx%d image to %dx%d px; photos at least as large as the training size work better", width, height, *resized)
    return image.resize(resized, resample).crop((left, top, left + size[0], top + size[1]))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def load_training_images(
    files: Sequence[str | os.PathLike], size: tuple[int, int], masks: Mapping[str, Image.Image] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The images cropped to `size` (width, height) and ready for the VAE, (n, 3, height, width); the (n, 4)
    geometry of each crop: original height and width, crop top and left in the resized image (SDXL
    conditions on them: `original_size` and `crops_coords_top_left`, as its training scripts pass them);
    and, when `masks` (`{file: mask}`) names any of the files, (n, 1, height, width) subject masks in
    [0, 1] cut the same way (1 for files without a mask), else None."""
    images, geometry, cut_masks = [], [], []
    for file in files:
        image = load_image(file, min(MIN_SIDE, *size))
        (_, _), (left, top) = cover_crop(image.width, image.height, size)
        images.append(image_to_tensor(fit_crop(image, size)))
        geometry.append([image.height, image.width, top, left])
        mask = (masks or {}).get(str(file))
        if mask is None:
            cut_masks.append(torch.ones(1, size[1], size[0]))
        else:
            array = np.asarray(fit_crop(mask.resize(image.size), size, Image.Resampling.BILINEAR), dtype=np.float32)  # (H, W)
            cut_masks.append(torch.from_numpy(array)[None] / 255.0)
    named = masks is not None and any(str(f) in masks for f in files)
    return torch.stack(images), torch.tensor(geometry, dtype=torch.float32), torch.stack(cut_masks) if named else None
