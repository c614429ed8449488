"""The measured work: one training step (forward + backward + optimiser step) and one inference
step of a UNet, on fixed random inputs shaped for its config (or with the text conditioning computed in
the step, `text_workload.py`), timed with device synchronisation."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError

TEXT_TOKENS = 77  # CLIP's context length: every SD pipeline pads prompts to it
Condition = Callable[[dict], dict]  # the UNet's inputs -> the same with their text conditioning computed now


def latent_size(unet: nn.Module, resolution: int, vae_scale_factor: int) -> int:
    """Latent side for `resolution` px, checked against the UNet's downsampling."""
    multiple = vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise UserError(
            f"resolution {resolution} does not fit this UNet; "
            f"accepted: a multiple of {multiple} (e.g. {max(multiple, resolution // multiple * multiple)})"
        )
    return resolution // vae_scale_factor


def unet_inputs(unet: nn.Module, batch: int, size: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Random latents, timesteps, text states (and SDXL's pooled text + time ids) for `unet`."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    text_dim = cfg.cross_attention_dim
    if isinstance(text_dim, (list, tuple)):
        text_dim = text_dim[0]
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, text_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        side = float(size * 8)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]] * batch),
        }
    return _to(inputs, device, dtype)


def _to(value, device: torch.device, dtype: torch.dtype):
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device)


class Workload:
    """Training and inference steps of `unet` on one fixed batch; `autocast_dtype` float32 = no autocast."""

    def __init__(self, unet: nn.Module, inputs: dict, autocast_dtype: torch.dtype, device: torch.device) -> None:
        self.unet, self.inputs, self.device = unet, inputs, device
        g = torch.Generator().manual_seed(1)
        sample = inputs["sample"]
        self.target = torch.randn(sample.shape, generator=g).to(device)  # (b, c, h, w) float32 noise
        self.autocast = (
            nullcontext if autocast_dtype == torch.float32 else lambda: torch.autocast(device_type=device.type, dtype=autocast_dtype)
        )

    def _forward(self, sample: torch.Tensor, condition: Condition | None = None) -> torch.Tensor:
        with self.autocast():
            inputs = self.inputs if condition is None else condition(self.inputs)
            return self.unet(**{**inputs, "sample": sample}).sample

    def train_step(self, optimisers: Sequence[torch.optim.Optimizer], condition: Condition | None = None) -> None:
        """Forward, MSE to fixed noise, backward, a step of each optimiser. `condition` replaces the fixed
        text inputs by ones computed in the step (a text encoder training too). Without optimisers (the
        floor) the gradient goes to the input latents, so backward runs through the whole frozen network."""
        sample = self.inputs["sample"]
        if not optimisers:
            sample = sample.detach().requires_grad_(True)
        loss = nn.functional.mse_loss(self._forward(sample, condition).float(), self.target)
        loss.backward()
        for optimiser in optimisers:
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)

    @torch.no_grad()
    def inference_step(self) -> None:
        self._forward(self.inputs["sample"])

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def timed(self, work: Callable[[], object]) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of `work()`, the device's queue drained before and after.

        On a CPU shared with other jobs, CPU seconds with one thread stay close to the quiet-machine
        time while wall seconds do not (with more threads they also count threads spinning at barriers).
        """
        self.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        work()
        self.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu
