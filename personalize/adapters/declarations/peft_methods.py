"""Options and defaults of the peft baselines DoRA, LoHa, LoKr and OFT (the methods:
`personalize/adapters/peft_methods.py`). Each default cites the peft 0.21.2 config field it comes from."""

from __future__ import annotations

from dataclasses import dataclass

from . import AdapterConfig, Declaration, TrainDefaults, declare


@dataclass
class DoRAConfig(AdapterConfig):
    rank: int = 8  # LoraConfig.r default (peft tuners/lora/config.py)
    alpha: float = 8.0  # LoraConfig.lora_alpha default: alpha = r, update scale 1


@dataclass
class LoHaConfig(AdapterConfig):
    rank: int = 8  # LoHaConfig.r default (peft tuners/loha/config.py)
    alpha: float = 8.0  # LoHaConfig.alpha default: alpha = r, update scale 1


@dataclass
class LoKrConfig(AdapterConfig):
    rank: int = 8  # LoKrConfig.r default (peft tuners/lokr/config.py)
    alpha: float = 8.0  # LoKrConfig.alpha default: alpha = r, update scale 1
    decompose_factor: int = -1  # LoKrConfig.decompose_factor default: split each width near its square root
    decompose_both: bool = False  # LoKrConfig.decompose_both default: the left Kronecker factor is a full matrix


@dataclass
class OFTConfig(AdapterConfig):
    block_size: int = 32  # OFTConfig.oft_block_size default (peft tuners/oft/config.py; r = 0 derives the block count)
    use_cayley_neumann: bool = True  # OFTConfig.use_cayley_neumann field default (5 Neumann terms instead of an inverse)


DORA = declare(
    Declaration(
        name="dora",
        description="DoRA (peft): LoRA direction + trained per-row magnitude of each attention projection",
        config_cls=DoRAConfig,
        train_defaults=TrainDefaults(lr=1e-4, steps=500, source="as the LoRA baseline (DoRA paper: DoRA uses LoRA's settings)"),
    )
)
LOHA = declare(
    Declaration(
        name="loha",
        description="LoHa (peft): Hadamard product of two low-rank updates on each attention projection",
        config_cls=LoHaConfig,
        train_defaults=TrainDefaults(lr=1e-4, steps=500, source="as the LoRA baseline (peft gives no LoHa training defaults)"),
    )
)
LOKR = declare(
    Declaration(
        name="lokr",
        description="LoKr (peft): Kronecker product of a small and a low-rank matrix on each attention projection",
        config_cls=LoKrConfig,
        train_defaults=TrainDefaults(lr=1e-4, steps=500, source="as the LoRA baseline (peft gives no LoKr training defaults)"),
    )
)
OFT = declare(
    Declaration(
        name="oft",
        description="OFT (peft): block-diagonal orthogonal rotation of each attention projection's input",
        config_cls=OFTConfig,
        train_defaults=TrainDefaults(lr=1e-4, steps=500, source="as the LoRA baseline (peft gives no OFT training defaults)"),
    )
)
