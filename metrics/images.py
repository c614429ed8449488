"""Finding and opening image files, with errors that name the bad file and the accepted formats."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not recursive, hidden files skipped), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def open_image(path: Path) -> Image.Image:
    """The image at `path`, fully decoded and converted to RGB."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}; accepted: valid {', '.join(IMAGE_SUFFIXES)} files") from err


def png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG file (empty for other formats)."""
    try:
        with Image.open(path) as image:
            return dict(getattr(image, "text", {}) or {})
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def _too_large(path: Path, err: Image.DecompressionBombError) -> ValueError:
    """PIL's decompression-bomb guard refused `path` (its text names no file): one line that does."""
    return ValueError(f"image {path} is too large to evaluate ({str(err).rstrip('.')}); downscale it first")
