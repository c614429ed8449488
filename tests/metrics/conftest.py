"""Fixtures for the metrics tests: offline hub settings, and temp folders of real and generated images."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest
from metrics_testdata import save_image
from PIL import PngImagePlugin

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def make_real(tmp_path: Path) -> Callable[..., Path]:
    """make_real(subjects=None, n=3): one folder of images, or one subfolder per subject name."""

    def make(subjects: list[str] | None = None, n: int = 3, name: str = "real") -> Path:
        root = tmp_path / name
        for s, folder in enumerate([root / sub for sub in subjects] if subjects else [root]):
            for i in range(n):
                save_image(folder / f"img{i}.jpg", seed=100 * s + i)
        return root

    return make


@pytest.fixture
def make_generated(tmp_path: Path) -> Callable[..., Path]:
    """make_generated(records, manifest=True, png_text=True, name="generated"): PNGs (+ manifest.jsonl)."""

    def make(records: list[dict], manifest: bool = True, png_text: bool = True, name: str = "generated") -> Path:
        folder = tmp_path / name
        for i, record in enumerate(records):
            info = PngImagePlugin.PngInfo()
            if png_text:
                for key, value in record.items():
                    if key not in ("file", "adapters"):
                        info.add_text(key, "" if value is None else str(value))
                info.add_text("parameters", json.dumps(record))
            save_image(folder / record["file"], seed=1000 + i, size=(64, 64), pnginfo=info)
        if manifest:
            (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return folder

    return make
