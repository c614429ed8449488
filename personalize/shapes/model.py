"""The built-in `shapes` model: architecture, and loading the weights shipped in the package.

A complete Stable Diffusion pipeline at 32 px, trained from scratch on the shapes world by
`python -m personalize.shapes.pretrain` (settings and measured time in `data/shapes.json`):
- `AutoencoderKL` with two levels (2x downsampling): 32x32x3 images <-> 16x16x4 latents;
- `UNet2DConditionModel` with three levels (32, 64, 64 channels; cross-attention on the first
  two, 2 heads) conditioned on 77 tokens of 64-d text states, epsilon prediction, SD 1.5's noise schedule;
- a 2-layer, 64-d `CLIPTextModel` with the CLIP BPE tokenizer the project already ships, trained
  jointly with the UNet and frozen afterwards, as in SD.
Weights are stored once in fp16 (`data/shapes.safetensors`, prefixes `unet.`, `vae.`,
`text_encoder.`) and loaded in float32 unless asked otherwise.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

DATA_DIR = Path(__file__).parent / "data"
WEIGHTS = DATA_DIR / "shapes.safetensors"
RECORD = DATA_DIR / "shapes.json"

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    # diffusers' legacy name: this is the number of heads (2: 16- and 32-d heads). 8 heads of 4-8 dims made
    # CPU attention 53% of a training step; 2 heads train 1.7x faster per step (0.65 vs 1.12 s, batch 32, 2 threads).
    attention_head_dim=2,
    norm_num_groups=16,
)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
    mid_block_add_attention=False,  # 16x16 latents need no attention; 3x cheaper VAE steps
)
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# SD 1.5's training noise schedule; DPM-Solver++ (2M) samples well in 20-30 steps.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_components() -> dict[str, Any]:
    """Freshly initialised unet, vae and text_encoder (random weights; pretraining starts here)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return {
        "unet": UNet2DConditionModel(**UNET_CONFIG),
        "vae": AutoencoderKL(**VAE_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
    }


def assemble_pipeline(unet, vae, text_encoder):
    """A `StableDiffusionPipeline` around the three models, with the shipped tokenizer and scheduler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ..models import clip_tokenizer

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.register_to_config(_name_or_path="shapes")
    return pipe


@lru_cache(maxsize=1)
def _stored_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not WEIGHTS.is_file():
        raise UserError(
            f"the built-in 'shapes' model is missing ({WEIGHTS}); reinstall personalize, "
            "or rebuild it with `python -m personalize.shapes.pretrain`"
        )
    return load_file(str(WEIGHTS))


def stored_scaling_factor() -> float:
    return float(json.loads(RECORD.read_text())["vae_scaling_factor"])


def shapes_pipeline():
    """The pretrained `shapes` pipeline in float32 on the CPU (the caller moves it)."""
    parts = build_components()
    state = _stored_state()
    for name, module in parts.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)})
        module.requires_grad_(False)
        module.eval()
    parts["vae"].register_to_config(scaling_factor=stored_scaling_factor())
    return assemble_pipeline(**parts)


def shapes_unet():
    return shapes_pipeline().unet
