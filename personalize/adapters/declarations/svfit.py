"""SVFit's options and defaults (the method: `personalize/adapters/svfit.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import AdapterConfig, Declaration, TrainDefaults, declare


@dataclass
class SVFitConfig(AdapterConfig):
    rank: int | None = None  # None = full rank min(out, in), the paper's main setting (§III-B)


SVFIT = declare(
    Declaration(
        name="svfit",
        description="SVFit: trains only the top singular values of each attention projection (tiny files)",
        config_cls=SVFitConfig,
        train_defaults=TrainDefaults(lr=2e-3, steps=1000, source="svfit.txt §IV: large lr 3e-3..2e-2 (NLP); SD range 1e-3..5e-3"),
    )
)
