"""Helpers shared by tests: tiny UNet families and deterministic inputs for them."""

from __future__ import annotations

import torch

UNET_STYLES = ("sd1", "sd2", "sdxl")


def unet_inputs(unet, batch: int = 2, seed: int = 0, size: int = 16) -> dict:
    """Random latents (`size` x `size`), timesteps and text conditioning matching `unet`'s config.

    16x16 latents instead of the tiny UNets' native 32x32: every layer still runs (adapters do not
    depend on the spatial size) at a quarter of the attention tokens, which keeps the suite fast.
    """
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 7, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return inputs


def run_unet(unet, inputs: dict) -> torch.Tensor:
    return unet(**inputs).sample


def force_form(monkeypatch, name: str) -> None:
    """Every adapted layer runs form `name` where its slot offers it, else "weight" (adapters/forms.py)."""
    from personalize.adapters import slots

    monkeypatch.setattr(slots, "choose", lambda key, forms, *args: name if name in forms else "weight")
