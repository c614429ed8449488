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
) -> list[Image.Image]:
    """One image per validation prompt; prompt i always uses seed `seed + i`."""
    sampler = pipe.scheduler
    pipe.scheduler = dpm_solver(pipe)
    was_training = pipe.unet.training
    pipe.unet.eval()
    images = []
    try:
        for i in range(len(positive)):
            index = torch.tensor([i])
            with autocast():
                images += pipe(
                    **positive.take(index).pipeline_kwargs(negative.take(index)),
                    height=resolution,
                    width=resolution,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed + i),
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
