"""FRoD's options and defaults (the method: `personalize/adapters/frod.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import AdapterConfig, Declaration, TrainDefaults, declare


@dataclass
class FRoDConfig(AdapterConfig):
    density: float = 0.01  # s = nnz(S_i) / n^2: the paper's main setting FRoD(s=0.01) (Table 2)
    pi: float = 1e-3  # regulariser in T = mean_i inv(Q_i^T Q_i + pi I) (ADAPTERS.md §5, frod.txt Eq. 3)
    seed: int = 0  # seeds the index pattern of each S_i (the pattern itself is saved with the adapter)


FROD = declare(
    Declaration(
        name="frod",
        description="FRoD: full-rank updates in a basis shared by same-role layers, diagonal + sparse rotations",
        config_cls=FRoDConfig,
        train_defaults=TrainDefaults(
            lr=5e-4,
            steps=1000,
            source="frod.txt Table 8 (released settings): lr(Sigma) 5e-4, lr(S) 5e-5; the paper has no SD setting, "
            "steps as the other methods",
        ),
    )
)
