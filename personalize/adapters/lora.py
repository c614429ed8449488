"""LoRA baseline through peft: rank-r update `B A * alpha / r` on the same targets as the other methods.

This is the reference every benchmark compares against (ADAPTERS.md "Baseline: LoRA": rank 4,
alpha 4, gaussian init). peft owns the layers (`peft_slot.PeftSlot`); the core merges by swapping
weights, as for every other method, so unmerge and detach restore W0 bit-exactly.

Targets: preset `attention` (default) is diffusers' DreamBooth-LoRA set, the attention projections.
Preset `attention_convs` adds the 3x3 convs of the ResNet blocks and resamplers, as kohya's LoCon
(`conv_dim`) and LyCORIS do: a conv `W: (out, in, k, k)` gets `B: (out, r, 1, 1)` after
`A: (r, in, k, k)`, i.e. r * (in*k*k + out) parameters. On the built-in `shapes` model this is what
lets LoRA draw a shape pretraining never drew (BENCHMARKS.md, "Quality on `shapes`").
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .base import register
from .declarations.lora import LORA, LoRAConfig
from .peft_slot import PeftMethod


@register
class LoRA(PeftMethod):
    declaration = LORA

    @classmethod
    def validate(cls, config: LoRAConfig) -> None:
        if config.rank < 1:
            raise UserError(f"lora rank must be a positive integer, got {config.rank}")

    @classmethod
    def peft_config(cls, config: LoRAConfig, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, init_lora_weights="gaussian")

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: LoRAConfig) -> int:
        weight = layer.weight
        fan_in = weight[0].numel()
        return config.rank * (fan_in + weight.shape[0])
