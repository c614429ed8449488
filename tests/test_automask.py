"""Automatic loss masks: the tiny CLIPSeg's masks (size, mode, determinism, progress), load errors, `personalize masks`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from personalize.automask import auto_masks, load_segmenter
from personalize.cli import main
from personalize.data import mask_file
from personalize.errors import UserError


@pytest.fixture(scope="module")
def segmenter():
    return load_segmenter("tiny", "cpu")


def photos(folder, sizes=((96, 64), (64, 128), (80, 80))) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for index, (width, height) in enumerate(sizes):
        path = folder / f"photo{index}.png"
        Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_masks_match_each_image_and_are_deterministic(segmenter, tmp_path):
    images = [Image.open(p) for p in photos(tmp_path)]
    calls = []
    masks = auto_masks(images, "dog", segmenter, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert [m.size for m in masks] == [im.size for im in images]
    assert all(m.mode == "L" for m in masks)
    assert calls == [(2, 3), (3, 3)]
    again = auto_masks(images, "dog", load_segmenter("tiny", "cpu"), batch_size=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(masks, again))
    assert load_segmenter("tiny", "cpu") is segmenter  # cached


def test_tiny_segmenter_leaves_the_global_rng_alone():
    import torch

    from personalize.automask import _build_tiny

    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    _build_tiny()
    assert torch.equal(torch.rand(3), expected)


def test_unknown_model_is_a_one_line_error_naming_it():
    with pytest.raises(UserError, match="segmentation model 'no-such-org/no-such-clipseg' cannot be loaded") as info:
        load_segmenter("no-such-org/no-such-clipseg", "cpu")
    assert "\n" not in str(info.value) and "masks 'files'" in str(info.value)


def test_cli_writes_masks_next_to_images_and_keeps_existing_ones(tmp_path, capsys):
    files = photos(tmp_path)
    Image.new("L", (96, 64), 7).save(mask_file(files[0]))  # the user's own mask
    assert main(["masks", str(tmp_path), "--class-noun", "dog", "--mask-model", "tiny", "--device", "cpu"]) == 0
    assert "wrote 2 mask(s)" in capsys.readouterr().out
    for file in files:
        with Image.open(mask_file(file)) as mask, Image.open(file) as image:
            assert mask.mode == "L" and mask.size == image.size
    assert np.asarray(Image.open(mask_file(files[0]))).max() == 7  # kept

    assert main(["masks", str(tmp_path), "--class-noun", "dog", "--mask-model", "tiny", "--device", "cpu"]) == 0
    assert "already have a mask" in capsys.readouterr().out
    assert main(["masks", str(files[0]), "--class-noun", "dog", "--mask-model", "tiny", "--device", "cpu", "--overwrite"]) == 0
    assert np.asarray(Image.open(mask_file(files[0]))).max() != 7  # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f.name for f in files] + [mask_file(f).name for f in files])


@pytest.mark.parametrize(
    "argv",
    [
        ["masks", "no/such/folder", "--class-noun", "dog"],
        ["masks", ".", "--class-noun", "  "],
        ["masks", "photo0.mask.png", "--class-noun", "dog"],
    ],
)
def test_cli_errors_are_one_line_with_status_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new("L", (96, 64)).save(mask_file(photos(tmp_path)[0]))
    assert main([*argv, "--mask-model", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_cli_checks_every_image_before_writing_any_mask(tmp_path, capsys):
    files = photos(tmp_path, sizes=[(64, 64)] * 6)  # more than one batch before the bad file
    (tmp_path / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    assert main(["masks", str(tmp_path), "--class-noun", "dog", "--mask-model", "tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zz-broken.png" in err[0], err
    assert not any(mask_file(f).exists() for f in files)


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): creating a file in `folder` fails as on a read-only mount (works as root too)."""
    import errno
    import os

    folders = []
    real_open = os.open

    def guarded_open(path, flags, *args, **kwargs):
        creates = flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0))
        target = os.path.abspath(os.fsdecode(path))
        if creates and any(target == f or os.path.dirname(target) == f for f in folders):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    return lambda folder: folders.append(os.path.abspath(folder))


def test_cli_read_only_folder_names_the_folder_and_writes_nothing(tmp_path, capsys, read_only):
    files = photos(tmp_path)
    read_only(tmp_path)
    assert main(["masks", str(tmp_path), "--class-noun", "dog", "--mask-model", "tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"mask folder '{tmp_path}': the file system is read-only" in err[0], err
    assert ".tmp" not in err[0] and ".write-check-" not in err[0]
    assert sorted(tmp_path.iterdir()) == sorted(files)


def test_mask_write_error_names_the_mask_not_its_temporary_file(tmp_path, read_only):
    from personalize.commands.masks import write_mask

    (image,) = photos(tmp_path, sizes=[(64, 64)])
    read_only(tmp_path)
    with pytest.raises(UserError, match=rf"^mask '{mask_file(image)}': the file system is read-only"):
        write_mask(image, Image.new("L", (64, 64)))
