"""The Train tab's mask editor: the picker's choices, the editor's content for one photo, the painted
mask read back from it, and the status line. Masks stay in the form (one per accepted photo, or None)
until training starts, when the workspace writes them next to the image copies as `<image>.mask.png`."""

from __future__ import annotations

import functools
import hashlib
import html
import io
import tempfile
from pathlib import Path

from PIL import Image, ImageChops

from personalize.atomic import atomic_path
from personalize.data import load_image

from ..workspace import upright_size

MASK_OPACITY = 0.6  # the mask brush paints translucent white: the photo stays visible under the strokes


def mask_choices(images: list[str]) -> list[tuple[str, int]]:
    """(label, index) of each accepted image for the mask editor's picker."""
    return [(f"{index + 1}. {Path(path).name}", index) for index, path in enumerate(images)]


def mask_status(images: list[str], masks: list[Image.Image | None]) -> str:
    """Which accepted images have a mask."""
    if not images:
        return "Upload images to draw their masks."
    named = [Path(path).name for path, mask in zip(images, masks) if mask is not None]
    if not named:
        return f"No masks: the {len(images)} image(s) train on the whole picture."
    return f"Masks for {len(named)} of {len(images)} image(s): {html.escape(', '.join(named))}."


def editor_value(images: list[str], masks: list[Image.Image | None], index: int | None) -> dict | None:
    """The editor's content for image `index`: the upright photo, and its mask (if any) as a layer of the
    brush's translucent white."""
    if index is None or not 0 <= index < len(images):
        return None
    mask = masks[index] if index < len(masks) else None
    layers = []
    if mask is not None:
        alpha = mask.point(lambda value: round(value * MASK_OPACITY))
        layers.append(png_file(Image.merge("RGBA", (*Image.new("RGB", mask.size, "white").split(), alpha))))
    return {"background": png_file(load_image(images[index])), "layers": layers, "composite": None}


@functools.cache
def _editor_files() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="personalize-mask-editor-")  # removed when the app exits


def png_file(image: Image.Image) -> str:
    """`image` as a PNG file named by its content, written once: Gradio rewrites the cache file of an
    image it is handed while the browser may still be reading it, but copies a file path only once."""
    data = io.BytesIO()
    image.save(data, format="PNG")
    path = Path(_editor_files().name) / f"{hashlib.sha256(data.getvalue()).hexdigest()[:32]}.png"
    if not path.exists():
        with atomic_path(path) as tmp:
            tmp.write_bytes(data.getvalue())
    return str(path)


def drawn_mask(value: dict | None, image: str) -> Image.Image | None:
    """The painted pixels of the editor's layers (white = subject) at `image`'s upright size; None if nothing is painted."""
    alphas = [layer.convert("RGBA").getchannel("A") for layer in (value or {}).get("layers") or [] if layer is not None]
    if not alphas:
        return None
    mask = functools.reduce(ImageChops.lighter, alphas).point(lambda alpha: min(255, round(alpha / MASK_OPACITY)))
    size = upright_size(Path(image))
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask if mask.getbbox() else None
