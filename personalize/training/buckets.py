"""Aspect-ratio buckets: each photo trains at the size of about `resolution^2` pixels whose aspect
ratio is nearest its own, instead of a centre square crop (NovelAI's bucketing, as in kohya
sd-scripts, OneTrainer and SimpleTuner).

Bucket sizes (width, height) have sides that are multiples of the UNet's granularity `step` (64 px on
Stable Diffusion: the VAE's factor 8 times the UNet's three 2x downsamplings; 8 px on `shapes`),
between `resolution / 2` and `2 * resolution`, with at most `resolution^2` pixels: for each width
the tallest height that fits, and the transposed size. A photo goes to the bucket of nearest
log aspect ratio (ties: the larger area), then is resized to cover it and centre-cropped, so a
3:2 photo at 512 px trains at 640 x 384 and loses a tenth of its height instead of a third of its width.

A batch holds rows of one bucket only (one UNet call per shape). Each epoch shuffles the photos
within every bucket, cuts them into batches (the last one of a bucket may be smaller) and shuffles
the batches; the order depends only on (seed, epoch), so a resumed run visits the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..data import load_image
from .latents import EPOCH_SEED_STRIDE, LatentSet, encode_files

Size = tuple[int, int]  # (width, height) px


def granularity(pipe) -> int:
    """Pixels per step of a side the UNet accepts: the VAE's factor times 2 per downsampling block."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)


def bucket_sizes(resolution: int, step: int) -> list[Size]:
    """Every (width, height) of at most resolution^2 pixels, sides multiples of `step` in
    [resolution / 2, 2 * resolution], each the largest for its width; sorted by aspect ratio."""
    low = max(step, (resolution // 2) // step * step)
    high = 2 * resolution
    sizes = set()
    for width in range(low, high + 1, step):
        height = min(high, resolution * resolution // width // step * step)
        if height >= low:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, sizes: Sequence[Size]) -> Size:
    """The bucket whose log aspect ratio is nearest the image's (ties: the larger area)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


@dataclass
class BucketedLatents:
    """Latent sets of one size each; row numbers are global (photo i, its mirrored copy n + i), as in `LatentSet`."""

    sets: list[LatentSet]
    rows: list[torch.Tensor]  # global row numbers of each set's rows, in the set's order

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows)

    def groups(self) -> list[tuple[LatentSet, torch.Tensor]]:
        return list(zip(self.sets, self.rows))

    def locate(self, index: torch.Tensor) -> tuple[LatentSet, torch.Tensor]:
        """The set holding rows `index` (all in one bucket) and their row numbers in it."""
        for latents, rows in zip(self.sets, self.rows):
            local = (rows[None, :] == index.cpu()[:, None]).nonzero()  # (matches, 2): (position in index, row in set)
            if len(local) == len(index):
                return latents, local[local[:, 0].argsort(), 1]
        raise ValueError(f"rows {index.tolist()} are not all in one bucket")

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        latents, local = self.locate(index)
        return latents.sample(local, generator)

    def time_ids(self, index: torch.Tensor) -> torch.Tensor:
        latents, local = self.locate(index)
        return latents.time_ids(local)

    def masks(self, index: torch.Tensor) -> torch.Tensor | None:
        latents, local = self.locate(index)
        return latents.masks(local)

    def batch(self, slot: int, size: int, seed: int) -> torch.Tensor:
        """The rows of global micro-batch `slot`: at most `size` rows of one bucket."""
        per_epoch = sum(math.ceil(len(r) / size) for r in self.rows)
        epoch, offset = divmod(slot, per_epoch)
        generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
        batches = []
        for rows in self.rows:
            shuffled = rows[torch.randperm(len(rows), generator=generator)]
            batches += [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
        return batches[int(torch.randperm(len(batches), generator=generator)[offset])]


def encode_bucketed(
    vae,
    files: Sequence[str],
    sizes: Sequence[Size],
    batch_size: int,
    device: torch.device,
    flip: bool = False,
    progress: Callable[[int, int], None] | None = None,
    masks: Mapping[str, Image.Image] | None = None,
) -> BucketedLatents:
    """Encode each file at its bucket's size (`encode_files` per bucket); row numbers as if unbucketed."""
    groups: dict[Size, list[int]] = {}
    for i, file in enumerate(files):
        width, height = load_image(file, min_side=1).size
        groups.setdefault(nearest_bucket(width, height, sizes), []).append(i)
    sets, rows, done = [], [], 0
    total = len(files) * (2 if flip else 1)
    for size, members in sorted(groups.items()):
        step = (lambda d, _t, base=done: progress(base + d, total)) if progress is not None else None
        sets.append(encode_files(vae, [files[i] for i in members], size, batch_size, device, flip, step, masks))
        own = torch.tensor(members)
        rows.append(torch.cat([own, own + len(files)]) if flip else own)
        done += len(sets[-1])
    return BucketedLatents(sets, rows)
