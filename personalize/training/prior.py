"""Class images for prior preservation (DreamBooth §3.3): reuse those on disk, generate the missing ones.

Generated images depend only on (base model, class prompt, resolution, seed, sampler), so by default
they live in a cache folder keyed by those and are shared by every run that needs the same ones.
Each image is written atomically with its generation parameters in PNG text chunks; existing
files are never changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from ..atomic import atomic_path
from ..cache import cache_dir
from ..data import IMAGE_SUFFIXES, list_image_files

log = logging.getLogger(__name__)

CLASS_SEED_BASE = 1_000_000  # class image i uses seed CLASS_SEED_BASE + i: fixed, so caches are reusable across runs


def default_class_dir(base_model: str, class_prompt: str, resolution: int, sample_steps: int) -> Path:
    key = json.dumps([base_model, class_prompt, resolution, sample_steps])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{class_prompt}-{resolution}px").strip("-")[:60]
    return cache_dir("class_images") / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def existing_class_images(folder: Path) -> list[Path]:
    if not folder.is_dir() or not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        return []
    return list_image_files(folder, what="class images")


@torch.no_grad()
def ensure_class_images(
    pipe,
    folder: Path,
    prompt: str,
    count: int,
    resolution: int,
    sample_steps: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[Path]:
    """The first `count` class images in `folder`, generating the missing ones with `pipe` (no adapter)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = existing_class_images(folder)
    missing = count - len(have)
    if missing > 0:
        log.info("generating %d class images for '%s' in %s", missing, prompt, folder)
        taken = {p.name for p in folder.iterdir()}
        names = _free_names(taken, missing)
        sampler = pipe.scheduler
        pipe.scheduler = dpm_solver(pipe)
        if progress is not None:
            progress(0, missing)
        try:
            for start in range(0, missing, batch_size):
                if stop is not None and stop():
                    break
                batch = names[start : start + batch_size]
                seeds = [CLASS_SEED_BASE + index for index, _ in batch]
                images = pipe(
                    prompt=[prompt] * len(batch),
                    height=resolution,
                    width=resolution,
                    num_inference_steps=sample_steps,
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                ).images
                for (_, name), seed, image in zip(batch, seeds, images):
                    info = PngInfo()
                    info.add_text("prompt", prompt)
                    info.add_text("seed", str(seed))
                    info.add_text("steps", str(sample_steps))
                    with atomic_path(folder / name) as tmp:
                        image.save(tmp, format="PNG", pnginfo=info)
                if progress is not None:
                    progress(min(start + batch_size, missing), missing)
        finally:
            pipe.scheduler = sampler
        have = existing_class_images(folder)
    return have[:count]


def _free_names(taken: set[str], count: int) -> list[tuple[int, str]]:
    names, index = [], 0
    while len(names) < count:
        name = f"class_{index:05d}.png"
        if name not in taken:
            names.append((index, name))
        index += 1
    return names


def dpm_solver(pipe):
    """DPM-Solver++ built from the pipeline's scheduler config (same noise schedule and prediction type)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
