"""Shared fixtures of the training tests: small synthetic photos and fast tiny-model settings."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw


def make_photos(folder, count: int = 3, size=(96, 80)) -> list:
    """Coloured shapes on a coloured background, one distinct image per index."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = random.Random(i)
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        draw.ellipse((10 + 5 * i, 8, 60, 58), fill=(200, 40, 30))
        draw.rectangle((rng.randrange(40), 50, size[0] - 5, size[1] - 4), fill=(30, 40, 200))
        path = folder / f"photo_{i}.png"
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    make_photos(folder)
    return folder


@pytest.fixture(scope="session")
def class_dir(tmp_path_factory):
    """Class images are generated once per session and reused by every test (as runs reuse the cache)."""
    return tmp_path_factory.mktemp("class_images")


@pytest.fixture
def fast(photos, class_dir, tmp_path):
    """TrainConfig keyword arguments for a run of a few seconds on the tiny model."""
    return dict(
        instance_images=str(photos),
        output_dir=str(tmp_path / "run"),
        base_model="tiny",
        steps=4,
        lr=1e-2,
        prior="none",
        class_images=2,
        class_data_dir=str(class_dir),
        sample_steps=2,
        validation_every=0,
        checkpoint_every=0,
        eval_timesteps=2,
        resolution=32,  # a quarter of tiny's native 64 px: every stage runs, in about half the time
    )
