"""Test data builders for the metrics tests: random images and generation-manifest records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_image(path: Path, seed: int, size: tuple[int, int] = (48, 40), pnginfo=None) -> Path:
    """A random RGB image (width, height) = size, deterministic in `seed`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, pnginfo=pnginfo)
    return path


def manifest_record(index: int, prompt: str, subject: str | None = None, token: str | None = "sks", method: str = "lora") -> dict:
    """A record of the `personalize generate` manifest contract."""
    return {
        "file": f"{index:04d}.png",
        "prompt": prompt,
        "negative_prompt": "",
        "seed": index,
        "steps": 2,
        "guidance": 7.5,
        "base_model": "tiny-sd",
        "adapters": [{"path": "adapter.safetensors", "scale": 1.0, "method": method, "token": token, "class_noun": "dog"}],
        "subject": subject,
    }
