"""Helpers shared by tests: tiny UNet families and deterministic inputs for them, text-encoder outputs."""

from __future__ import annotations

import ast
from pathlib import Path

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


def encode_text(pipe, part: str, prompts) -> torch.Tensor:
    """Text encoder `part`'s hidden states and pooled (SDXL's second encoder: projected) output for
    `prompts`, learned tokens expanded as the pipeline's `encode_prompt` expands them: (prompts, (seq + 1) * width)."""
    tokenizer, encoder = getattr(pipe, "tokenizer" if part == "text_encoder" else "tokenizer_2"), getattr(pipe, part)
    text = pipe.maybe_convert_prompt(list(prompts), tokenizer)
    ids = tokenizer(text, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return torch.cat([out.last_hidden_state.flatten(1), pooled], dim=1)


def force_form(monkeypatch, name: str) -> None:
    """Every adapted layer runs form `name` where its slot offers it, else "weight" (adapters/forms.py)."""
    from personalize.adapters import slots

    monkeypatch.setattr(slots, "choose", lambda key, forms, *args: name if name in forms else "weight")


def imported_top_level(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names
