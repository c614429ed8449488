"""Image latents, encoded once with the frozen VAE, and the order in which training visits them.

The VAE's posterior is cached as (mean, std) and a fresh latent is drawn from it at every step,
as diffusers' DreamBooth script does with `--cache_latents`: no VAE pass per step, same objective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..data import cover_crop, load_training_images

EPOCH_SEED_STRIDE = 1_000_003  # separates the per-epoch permutation seeds of different runs


@dataclass
class LatentSet:
    """Posterior of each image: latent = (mean + std * noise - shift) * scale."""

    mean: torch.Tensor  # (n, c, h, w)
    std: torch.Tensor  # (n, c, h, w)
    scale: float
    shift: float
    geometry: torch.Tensor | None = None  # (n, 4): original height, width, crop top, left (px); None = uncropped
    mask: torch.Tensor | None = None  # (n, 1, h, w): share of subject pixels per latent pixel; None = no masks
    size: tuple[int, int] | None = None  # (height, width) px of the encoded images

    def time_ids(self, index: torch.Tensor) -> torch.Tensor:
        """(b, 6) SDXL micro-conditioning of rows `index`: original size, crop top-left, target size."""
        target = torch.tensor([self.size], dtype=torch.float32).expand(len(index), 2)
        geometry = torch.cat([target, torch.zeros(len(index), 2)], dim=1) if self.geometry is None else self.geometry[index.cpu()]
        return torch.cat([geometry, target], dim=1)

    def __len__(self) -> int:
        return self.mean.shape[0]

    def batch(self, slot: int, size: int, seed: int) -> torch.Tensor:
        """The rows of global micro-batch `slot`: `size` rows of shuffled epochs (`epoch_indices`)."""
        return epoch_indices(len(self), slot * size, size, seed)

    def groups(self) -> list[tuple[LatentSet, torch.Tensor]]:
        """(latent set, its global row numbers) per image size: this one set (buckets have several)."""
        return [(self, torch.arange(len(self)))]

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[index.to(self.mean.device)], self.std[index.to(self.std.device)]
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        return (mean + std * noise - self.shift) * self.scale

    def masks(self, index: torch.Tensor) -> torch.Tensor | None:
        """(b, 1, h, w) subject masks of rows `index`, or None when no photo has one."""
        return None if self.mask is None else self.mask[index.to(self.mask.device)]

    def means(self) -> torch.Tensor:
        """The posterior means, scaled like training latents (the fixed evaluation set uses them)."""
        return (self.mean - self.shift) * self.scale


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int, device: torch.device) -> LatentSet:
    """Encode (n, 3, H, W) images in [-1, 1]; the VAE runs in float32 where its config asks for it (SDXL)."""
    dtype = vae.dtype
    upcast = dtype != torch.float32 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
        batch_size = 1  # a float32 VAE at 512-1024 px takes ~1 GB per image: keep the peak low on small GPUs
    try:
        means, stds = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device=device, dtype=vae.dtype)
            posterior = vae.encode(batch).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
    finally:
        if upcast:
            vae.to(dtype)
    config = vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    return LatentSet(torch.cat(means), torch.cat(stds), float(config.scaling_factor), float(shift), size=tuple(images.shape[-2:]))


def encode_files(
    vae,
    files: Sequence,
    size: tuple[int, int],
    batch_size: int,
    device: torch.device,
    flip: bool = False,
    progress: Callable[[int, int], None] | None = None,
    masks: Mapping[str, Image.Image] | None = None,
) -> LatentSet:
    """Load, crop to `size` (width, height) and encode image files in chunks (never all decoded images in
    memory at once). With `flip`, the mirrored images follow the originals (rows n..2n-1), their crop and
    masks mirrored too. `masks` (`{file: mask}`, white = subject) are cut like their images and averaged
    down to the latent grid. `progress(done, total)` is called after each chunk (mirrored ones included)."""
    parts, geometry, cut_masks = [], [], []
    total = len(files) * (2 if flip else 1)
    for mirrored in (False, True) if flip else (False,):
        for start in range(0, len(files), batch_size):
            images, crops, pixel_masks = load_training_images(files[start : start + batch_size], size, masks)  # (b, 3, H, W), (b, 4)
            if mirrored:
                images = torch.flip(images, dims=[3])
                pixel_masks = None if pixel_masks is None else torch.flip(pixel_masks, dims=[3])
                # the crop's left edge measured from the right: resized width - left - crop width
                resized_width = torch.tensor([cover_crop(int(w), int(h), size)[0][0] for h, w in crops[:, :2].tolist()])
                crops[:, 3] = resized_width - crops[:, 3] - size[0]
            part = encode_images(vae, images, batch_size, device)
            parts.append(part)
            geometry.append(crops)
            if masks:
                latent_size = tuple(part.mean.shape[-2:])
                full = (
                    torch.ones(len(images), 1, *latent_size)
                    if pixel_masks is None
                    else F.interpolate(pixel_masks, size=latent_size, mode="area")
                )
                cut_masks.append(full.to(part.mean.device))  # (b, 1, h, w)
            if progress is not None:
                progress(sum(len(p) for p in parts), total)
    first = parts[0]
    mask = torch.cat(cut_masks) if cut_masks else None
    return LatentSet(
        torch.cat([p.mean for p in parts]),
        torch.cat([p.std for p in parts]),
        first.scale,
        first.shift,
        torch.cat(geometry),
        mask,
        (size[1], size[0]),
    )


def epoch_indices(count: int, position: int, size: int, seed: int) -> torch.Tensor:
    """`size` indices from an endless sequence of shuffled epochs over `count` items, starting at `position`.

    Each epoch is a permutation seeded by (seed, epoch), so the order depends only on the position:
    a resumed run visits the images in the same order as an uninterrupted one.
    """
    picked = []
    for pos in range(position, position + size):
        epoch, offset = divmod(pos, count)
        generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
        picked.append(int(torch.randperm(count, generator=generator)[offset]))
    return torch.tensor(picked, dtype=torch.long)
