"""The denoising objective: noisy latents, the target the model predicts, loss weights, and the fixed
evaluation set that measures the same loss before and after training.

The target follows the scheduler config of the base model: the noise for epsilon-prediction
(SD 1.x, SD 2 base) or the velocity `alpha_t * noise - sigma_t * x0` for v-prediction (SD 2.x 768).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .conditioning import Conditioning

PREDICTION_TYPES = ("epsilon", "v_prediction")
EVAL_SEED = 20240  # fixed, independent of the run's seed: evaluation losses compare across runs and methods


def training_scheduler(pipe):
    """A DDPM scheduler with the base model's noise schedule and prediction type."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"base model predicts '{scheduler.config.prediction_type}'; training supports {', '.join(PREDICTION_TYPES)}")
    return scheduler


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas / (1.0 - alphas)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 10), written for the model's prediction target."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped / ratio


def dreambooth_loss(errors: torch.Tensor, weights: torch.Tensor | None, instances: int, prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth's loss from (b,) per-sample errors, instance rows first, class rows after them:
    mean(weights * instance errors) + prior_loss_weight * mean(class errors).

    Min-SNR `weights` apply to the instance rows only, as in diffusers' DreamBooth scripts: the prior
    loss keeps the class where it was at every noise level, and reweighting it would move that anchor.
    """
    instance, prior = errors[:instances], errors[instances:]
    if weights is not None:
        instance = instance * weights[:instances]
    if len(prior) == 0:
        return instance.mean()
    return instance.mean() + prior_loss_weight * prior.mean()


def evaluation_images(count: int, limit: int) -> torch.Tensor:
    """Indices of at most `limit` of `count` instance images, evenly spaced (all of them when count <= limit)."""
    if count <= limit:
        return torch.arange(count)
    return torch.linspace(0, count - 1, limit).round().long()


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(b,) mean squared error of each sample, in float32; with (b, 1, h, w) pixel `weights` (masked
    loss, broadcast over channels) the weighted mean sum(w * e) / sum(w)."""
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")  # (b, c, h, w)
    dims = tuple(range(1, prediction.ndim))
    if weights is None:
        return squared.mean(dim=dims)
    weights = weights.to(squared.device, torch.float32).expand_as(squared)
    return (squared * weights).sum(dim=dims) / weights.sum(dim=dims).clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class Batch:
    """One micro-batch: instance rows (with their loss masks) and any class-image rows (prior 'images')."""

    latents: torch.Tensor  # (b, c, h, w) instance rows
    conditioning: Conditioning  # b rows
    masks: torch.Tensor | None = None  # (b, 1, h, w) subject share per latent pixel; None = unmasked
    class_latents: torch.Tensor | None = None  # (k, c, h', w'); other sizes than the instances' with aspect buckets
    class_conditioning: Conditioning | None = None  # k rows

    @property
    def instances(self) -> int:
        return len(self.latents)

    def parts(self, background_weight: float) -> list[tuple[torch.Tensor, Conditioning, torch.Tensor | None]]:
        """(latents, conditioning, (rows, 1, h, w) loss weights or None) per UNet call, instance rows first:
        one call when the class rows have the instances' shape, else two. The weights are
        `mask + background_weight * (1 - mask)` on instance rows and 1 on class rows; None without masks."""
        weights = None if self.masks is None else self.masks + background_weight * (1.0 - self.masks)
        if self.class_latents is None:
            return [(self.latents, self.conditioning, weights)]
        class_weights = None if weights is None else torch.ones((len(self.class_latents), 1) + tuple(self.class_latents.shape[2:]))
        if self.class_latents.shape[1:] != self.latents.shape[1:]:
            return [(self.latents, self.conditioning, weights), (self.class_latents, self.class_conditioning, class_weights)]
        joined = None if weights is None else torch.cat([weights, class_weights.to(weights.device)])
        return [(torch.cat([self.latents, self.class_latents]), self.conditioning.cat(self.class_conditioning), joined)]


@dataclass
class EvalSet:
    """Instance latents x fixed timesteps with fixed noise: the loss on it is deterministic."""

    latents: torch.Tensor  # (m, c, h, w)
    noise: torch.Tensor  # (m, c, h, w)
    timesteps: torch.Tensor  # (m,)
    conditioning: Conditioning  # m rows

    @classmethod
    def build(cls, scheduler, latents: torch.Tensor, conditioning: Conditioning, timesteps_per_image: int) -> EvalSet:
        count = latents.shape[0]
        steps = scheduler.config.num_train_timesteps
        # evenly spaced over the whole schedule, centred in each of the equal intervals
        grid = ((torch.arange(timesteps_per_image) + 0.5) * steps / timesteps_per_image).long()  # (k,)
        timesteps = grid.repeat(count)  # (n*k,)
        index = torch.arange(count).repeat_interleave(timesteps_per_image)  # (n*k,)
        generator = torch.Generator().manual_seed(EVAL_SEED)
        noise = torch.randn((len(index),) + tuple(latents.shape[1:]), generator=generator).to(latents.device)
        return cls(latents[index.to(latents.device)], noise, timesteps.to(latents.device), conditioning.take(index))

    def __len__(self) -> int:
        return len(self.timesteps)

    @torch.no_grad()
    def error_sum(self, unet, scheduler, batch_size: int, autocast, progress: Callable[[int, int], None] | None = None) -> float:
        """Sum of the per-row errors; `progress(done, total)` after each batch (rows = images x timesteps)."""
        total, count = 0.0, 0
        for start in range(0, len(self.timesteps), batch_size):
            part = slice(start, start + batch_size)
            latents, noise, timesteps = self.latents[part], self.noise[part], self.timesteps[part]
            noisy = scheduler.add_noise(latents, noise, timesteps)
            conditioning = self.conditioning.take(torch.arange(start, start + len(timesteps)))
            with autocast():
                prediction = unet(noisy.to(unet.dtype), timesteps, **conditioning.unet_kwargs()).sample
            errors = per_sample_mse(prediction, target_for(scheduler, latents, noise, timesteps))
            total += errors.sum().item()
            count += len(errors)
            if progress is not None:
                progress(count, len(self.timesteps))
        return total


def evaluation_loss(
    sets: Sequence[EvalSet], unet, scheduler, batch_size: int, autocast, progress: Callable[[int, int], None] | None = None
) -> float:
    """Mean error over every row of `sets` (one set per image size: aspect buckets make several)."""
    rows, done, total = sum(len(s) for s in sets), 0, 0.0
    for part in sets:
        step = None if progress is None else (lambda d, _t, base=done: progress(base + d, rows))
        total += part.error_sum(unet, scheduler, batch_size, autocast, step)
        done += len(part)
    return total / rows
