"""Validation samples during training: fixed prompts and seeds, rendered with the adapter as it is now.

Prompt embeddings are computed once at the start, so the same noise and conditioning are used at
every validation: differences between grids come from training alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..atomic import atomic_path
from ..generate import image_grid
from .conditioning import Conditioning
from .prior import dpm_solver


@torch.no_grad()
def render_samples(
    pipe,
    positive: Conditioning,
    negative: Conditioning,
    seed: int,
    resolution: int,
    steps: int,
    guidance: float,
    autocast,
    batch_size: int,
) -> list[Image.Image]:
    """One image per validation prompt; prompt i always uses seed `seed + i`, whatever the batch.

    Up to `batch_size` prompts go through the pipeline together (each with its own generator, so its
    starting noise is the one a single-image call would draw). Measured on 2 CPU cores, 8 images (4
    prompts, 4 drift images) 4 per call against one per call: `shapes` 32 px 5.8 s vs 12.0 s, `tiny`
    64 px 25 s vs 35 s. On a GPU the batch trades memory for speed (`class_batch_size`)."""
    sampler = pipe.scheduler
    pipe.scheduler = dpm_solver(pipe)
    was_training = pipe.unet.training
    pipe.unet.eval()
    images = []
    try:
        for start in range(0, len(positive), batch_size):
            index = torch.arange(start, min(start + batch_size, len(positive)))  # (k,)
            with autocast():
                images += pipe(
                    **positive.take(index).pipeline_kwargs(negative.take(index)),
                    height=resolution,
                    width=resolution,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=[torch.Generator().manual_seed(seed + int(i)) for i in index],
                ).images
    finally:
        pipe.scheduler = sampler
        pipe.unet.train(was_training)
    return images


def save_grid(images: list[Image.Image], path: Path) -> Path:
    cols = min(len(images), 4)
    with atomic_path(path) as tmp:
        image_grid(images, cols).save(tmp, format="PNG")
    return path
