"""Class images for prior preservation (DreamBooth §3.3): reuse those on disk, generate the missing ones.

A run never makes more than it draws: each micro-batch takes `batch_size` class images, so a run of
N steps uses at most N x batch_size x accumulation x processes of them (`class_images_needed`).
Generated images depend only on (base model, class prompt, resolution, sampler, steps, guidance,
seed), so by default they live in a cache folder keyed by all of those (`default_class_dir`) and
are shared by every run that needs the same ones; a folder holding more than a run needs serves it
with its first images (image i always has seed CLASS_SEED_BASE + i). Each image is written
atomically with its generation parameters in PNG text chunks; existing files are never changed.
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
# diffusers' DreamBooth scripts render class images at the pipeline's default guidance, 7.5.
CLASS_GUIDANCE = 7.5
SAMPLER = "dpmsolver++"  # the DPMSolverMultistepScheduler algorithm `dpm_solver` builds (part of the cache key)


def class_images_needed(wanted: int, steps: int, batch_size: int, accumulation: int = 1, processes: int = 1) -> int:
    """How many class images a run uses: `wanted`, but never more than it draws (one class image per
    instance row: `batch_size` per micro-batch, `accumulation` micro-batches per step on each process)."""
    return min(wanted, steps * accumulation * processes * batch_size)


def model_identity(base_model: str) -> list:
    """What names the base model's weights in a cache key: a built-in or hub id as given; a local
    folder by its absolute path, a checkpoint file also by its size and modification time."""
    path = Path(base_model).expanduser()
    if not path.exists():
        return [base_model]
    path = path.resolve()
    if path.is_file():
        stat = path.stat()
        return [str(path), stat.st_size, stat.st_mtime_ns]
    return [str(path)]


def class_cache_key(base_model: str, class_prompt: str, resolution: int, sample_steps: int) -> str:
    """Everything the pixels of a generated class image depend on, besides its seed."""
    return json.dumps(
        {
            "model": model_identity(base_model),
            "prompt": class_prompt,
            "resolution": resolution,
            "sampler": SAMPLER,
            "steps": sample_steps,
            "guidance": CLASS_GUIDANCE,
            "seed_base": CLASS_SEED_BASE,
        },
        sort_keys=True,
    )


def default_class_dir(base_model: str, class_prompt: str, resolution: int, sample_steps: int) -> Path:
    """The cache folder of these class images: readable name, hash of the full key."""
    key = class_cache_key(base_model, class_prompt, resolution, sample_steps)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{class_prompt}-{resolution}px-{sample_steps}steps").strip("-")[:60]
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
    """The first `count` class images in `folder`, generating the missing ones with `pipe` (no adapter),
    `batch_size` per pipeline call; `progress(done, missing)` after each call."""
    folder.mkdir(parents=True, exist_ok=True)
    have = existing_class_images(folder)
    missing = count - len(have)
    if len(have):
        log.info("reusing %d class image(s) in %s", min(len(have), count), folder)
    if missing > 0:
        log.info("generating %d class image(s) for '%s' (%d DPM-Solver++ steps each) in %s", missing, prompt, sample_steps, folder)
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
                    guidance_scale=CLASS_GUIDANCE,
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                ).images
                for (_, name), seed, image in zip(batch, seeds, images):
                    info = PngInfo()
                    info.add_text("prompt", prompt)
                    info.add_text("seed", str(seed))
                    info.add_text("steps", str(sample_steps))
                    info.add_text("sampler", SAMPLER)
                    info.add_text("guidance", str(CLASS_GUIDANCE))
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
    """DPM-Solver++ (2nd order, the scheduler's defaults) built from the pipeline's scheduler config (same
    noise schedule and prediction type)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type=SAMPLER)
