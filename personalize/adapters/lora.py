"""LoRA baseline through peft: rank-r update `B A * alpha / r` on the same targets as the other methods.

This is the reference every benchmark compares against (ADAPTERS.md "Baseline: LoRA": rank 4,
alpha 4, gaussian init). peft owns the layers; the core merges by swapping weights, as for every
other method, so unmerge and detach restore W0 bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .base import AdapterConfig, Method, Slot, TrainDefaults, register

PEFT_NAME = "default"


@dataclass
class LoRAConfig(AdapterConfig):
    rank: int = 4  # the usual DreamBooth-LoRA baseline (diffusers' script default)
    alpha: float = 4.0  # alpha = rank: update scale 1, as in diffusers' DreamBooth-LoRA script


class PeftLoraSlot(Slot):
    """A peft LoRA layer seen through the core's Slot interface."""

    def __init__(self, root: nn.Module, name: str, lora_layer: nn.Module) -> None:
        super().__init__(lora_layer.base_layer)
        self.root, self.name, self.lora = root, name, lora_layer
        self.scale = 1.0

    def delta(self) -> torch.Tensor:
        return self.lora.get_delta_weight(PEFT_NAME).float()  # includes scaling = scale * alpha / r

    def set_scale(self, scale: float) -> None:
        self.scale = scale
        self.lora.set_scale(PEFT_NAME, scale)

    def set_live(self, live: bool) -> None:
        self.lora._disable_adapters = not live

    def named_trainables(self) -> list[tuple[str, nn.Parameter, str]]:
        return [
            ("lora_A", self.lora.lora_A[PEFT_NAME].weight, "main"),
            ("lora_B", self.lora.lora_B[PEFT_NAME].weight, "main"),
        ]

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p, _ in self.named_trainables()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param, _ in self.named_trainables():
                param.copy_(tensors[name])

    def remove(self) -> None:
        parent_name, _, child = self.name.rpartition(".")
        parent = self.root.get_submodule(parent_name) if parent_name else self.root
        setattr(parent, child, self.base)
        if not any(hasattr(m, "base_layer") for m in self.root.modules()) and hasattr(self.root, "peft_config"):
            del self.root.peft_config  # peft's marker; left behind it makes a later attach warn


@register
class LoRA(Method):
    name = "lora"
    description = "LoRA (peft): low-rank update B·A on the attention projections, the common baseline"
    config_cls = LoRAConfig
    train_defaults = TrainDefaults(lr=1e-4, steps=500, source="diffusers train_dreambooth_lora.py defaults (lr 1e-4, 500 steps)")

    @classmethod
    def validate(cls, config: LoRAConfig) -> None:
        if config.rank < 1:
            raise UserError(f"lora rank must be a positive integer, got {config.rank}")

    @classmethod
    def attach_layers(cls, layers, config, saved=None, root=None):
        from peft import LoraConfig, inject_adapter_in_model  # imported here: peft is slow to import

        peft_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(layers),
            init_lora_weights="gaussian",
        )
        inject_adapter_in_model(peft_config, root)
        slots = {name: PeftLoraSlot(root, name, root.get_submodule(name)) for name in layers}
        for slot in slots.values():
            slot.lora.to(slot.base.weight.device)
        return slots

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: LoRAConfig) -> int:
        weight = layer.weight
        fan_in = weight[0].numel()
        return config.rank * (fan_in + weight.shape[0])
