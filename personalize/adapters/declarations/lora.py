"""LoRA's options and defaults (the method: `personalize/adapters/lora.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import ATTENTION, CONVS, AdapterConfig, Declaration, TrainDefaults, declare, join_patterns


@dataclass
class LoRAConfig(AdapterConfig):
    rank: int = 4  # the usual DreamBooth-LoRA baseline (diffusers' script default)
    alpha: float = 4.0  # alpha = rank: update scale 1, as in diffusers' DreamBooth-LoRA script


LORA = declare(
    Declaration(
        name="lora",
        description="LoRA (peft): low-rank update B·A on the attention projections, the common baseline",
        config_cls=LoRAConfig,
        presets={"attention": ATTENTION, "attention_convs": join_patterns(ATTENTION, CONVS)},
        train_defaults=TrainDefaults(lr=1e-4, steps=500, source="diffusers train_dreambooth_lora.py defaults (lr 1e-4, 500 steps)"),
    )
)
