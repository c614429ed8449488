"""Instance image validation and conversion (personalize/data.py): every rejected input names the file,
odd-but-valid images are converted correctly, input files are never modified."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.data import (
    MAX_PIXELS,
    MIN_SIDE,
    fit_crop,
    image_to_tensor,
    list_image_files,
    load_image,
    load_training_images,
    validate_instance_images,
)
from personalize.errors import UserError


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def two_colour(size=(120, 80), left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (8-bit gray) with a tiny IDAT: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_folder_lists_images_and_skips_other_files(tmp_path):
    a = save(two_colour(), tmp_path / "b.png")
    b = save(two_colour(), tmp_path / "a.JPG")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    assert validate_instance_images(str(tmp_path)) == [str(b), str(a)]
    assert list_image_files([tmp_path, a]) == [b, a, a]  # folders and files mix in a list


@pytest.mark.parametrize("content", [[], ["notes.txt"]])
def test_folder_without_images_is_refused(tmp_path, content):
    for name in content:
        (tmp_path / name).write_text("not an image")
    with pytest.raises(UserError, match=r"no instance images found in folder .*accepted files: .*\.png"):
        validate_instance_images(tmp_path)


def test_empty_list_is_refused():
    with pytest.raises(UserError, match="no instance images given"):
        validate_instance_images([])


def test_non_image_file_named_explicitly(tmp_path):
    good = save(two_colour(), tmp_path / "ok.png")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(UserError, match=r"'.*notes\.txt' is not an image file .*accepted: .*\.jpg"):
        validate_instance_images([good, notes])


def test_corrupt_files(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\xff\xd8 this is not really a jpeg" * 10)
    with pytest.raises(UserError, match="fake.jpg"):
        validate_instance_images([fake])
    full = save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)), tmp_path / "cut.png")
    full.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(UserError, match=r"'.*cut\.png' is corrupt or truncated"):
        validate_instance_images(tmp_path)


def test_missing_and_unreadable_paths(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"'.*nowhere' does not exist"):
        validate_instance_images(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"'.*gone\.png' does not exist"):
        validate_instance_images([tmp_path / "gone.png"])
    locked = save(two_colour(), tmp_path / "locked.png")

    def refuse(path, mode="r", *args, **kwargs):  # what open() raises for a file without read permission
        raise PermissionError(13, "Permission denied", str(path))

    # chmod 000 does not stop root (CI containers), so the permission error is injected where the file is opened
    monkeypatch.setattr("personalize.data.open", refuse, raising=False)
    with pytest.raises(UserError, match=r"'.*locked\.png' cannot be read: Permission denied"):
        validate_instance_images([locked])


def test_too_small_image(tmp_path):
    save(Image.new("RGB", (MIN_SIDE - 1, 200)), tmp_path / "small.png")
    with pytest.raises(UserError, match=rf"'.*small\.png' is {MIN_SIDE - 1}x200 px; each side must be at least {MIN_SIDE} px"):
        validate_instance_images(tmp_path)


def test_a_small_model_trains_on_images_of_its_own_size(tmp_path):
    """`shapes` (32 px) makes 32 px class images: training at 32 px accepts them, at 64 px it does not."""
    path = tmp_path / "class.png"
    Image.new("RGB", (32, 32), "red").save(path)
    images, geometry, masks = load_training_images([path], (32, 32))
    assert images.shape == (1, 3, 32, 32) and geometry.tolist() == [[32, 32, 0, 0]] and masks is None
    with pytest.raises(UserError, match="32x32 px; each side must be at least 64 px"):
        load_training_images([path], (64, 64))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS**0.5) + 1000
    bomb = png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(UserError, match=rf"'.*bomb\.png' is too large \({side}x{side} px\).*megapixels"):
        validate_instance_images([bomb])


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # transparent black
    image.paste((255, 0, 0, 255), (0, 0, 40, 80))
    out = np.asarray(load_image(save(image, tmp_path / "cut.png")))
    assert out.shape == (80, 80, 3)
    assert tuple(out[10, 10]) == (255, 0, 0) and tuple(out[10, 70]) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (80, 80), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (40, 0, 80, 80))
    out = np.asarray(load_image(save(image, tmp_path / "p.png", transparency=0)))
    assert tuple(out[5, 5]) == (255, 255, 255) and tuple(out[5, 60]) == (0, 255, 0)


def test_grayscale_and_16_bit(tmp_path):
    gray = np.asarray(load_image(save(Image.new("L", (80, 80), 100), tmp_path / "g.png")))
    assert gray.shape == (80, 80, 3) and (gray == 100).all()
    deep = Image.fromarray(np.full((80, 80), 65535, dtype=np.uint16))
    out = np.asarray(load_image(save(deep, tmp_path / "deep.png")))
    assert (out == 255).all()


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (80, 80), (0, 255, 255, 0))  # pure red in print colours
    out = np.asarray(load_image(save(image, tmp_path / "print.tif")))
    assert out.shape == (80, 80, 3) and tuple(out[40, 40]) == (255, 0, 0)


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    path = save(two_colour((120, 80)), tmp_path / "phone.jpg", exif=exif, quality=95)
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (120, 80, 3)  # upright: 80 wide, 120 tall
    top, bottom = out[10, 40], out[110, 40]  # the stored left (red) half is on top once rotated
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_inputs_are_not_modified(tmp_path):
    paths = [save(two_colour(), tmp_path / "a.png"), save(Image.new("CMYK", (90, 70)), tmp_path / "b.jpg")]
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}
    validate_instance_images(tmp_path)
    for p in paths:
        fit_crop(load_image(p), (64, 64))
    assert {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths} == before
    assert sorted(tmp_path.iterdir()) == sorted(paths)


def test_fit_crop_and_tensor_range():
    image = two_colour((200, 100))
    square = fit_crop(image, (64, 64))
    assert square.size == (64, 64)
    tensor = image_to_tensor(square)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor[0, 32, 5] > 0.9 and tensor[2, 32, 58] > 0.9  # centre crop keeps both halves: red left, blue right


def test_every_rejected_image_is_named_at_once(tmp_path):
    save(two_colour(), tmp_path / "good.png")
    save(Image.new("RGB", (MIN_SIDE - 1, 200)), tmp_path / "small.png")
    (tmp_path / "fake.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match=r"2 of 3 instance images cannot be used: .*fake\.jpg.*; .*small\.png") as caught:
        validate_instance_images(tmp_path)
    assert "\n" not in str(caught.value)
