"""AOFT's options and defaults (the method and the sweep behind its learning rate: `personalize/adapters/aoft.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import AdapterConfig, Declaration, TrainDefaults, declare


@dataclass
class AOFTConfig(AdapterConfig):
    d: int = 8  # update rank; the rank of peft's LoRA-family defaults (r = 8), so baselines compare at equal rank


AOFT = declare(
    Declaration(
        name="aoft",
        description="AOFT (reconstructed from summaries): one vector per side generates near-orthogonal up/down projections",
        config_cls=AOFTConfig,
        train_defaults=TrainDefaults(
            lr=1e-3,
            steps=500,
            source="our sweep (30 steps on tiny, see aoft.py): lr 1e-2 matches LoRA's 30-step progress; / 10 as every default",
        ),
    )
)
