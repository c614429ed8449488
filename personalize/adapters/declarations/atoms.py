"""Options and defaults of `atoms`, the paper's configurations c1/c2/c3 (the method: `personalize/adapters/atoms.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import ATTENTION, CONVS, AdapterConfig, Declaration, declare, join_patterns
from .filter_atoms import TRAIN_DEFAULTS, FilterAtomsConfig
from .kron_atoms import KronAtomsConfig

# Per-part options of the paper's configurations (Table 9: "m=6, kc=4", "m=9, kc=8", "m=9, kc=8, m1=3").
CONFIGURATIONS: dict[str, dict[str, int]] = {
    "c1": dict(m=6, m1=0, m_c=6, kc=4),
    "c2": dict(m=9, m1=0, m_c=9, kc=8),
    "c3": dict(m=9, m1=3, m_c=9, kc=8),
}


@dataclass
class AtomsConfig(AdapterConfig):
    preset: str = ""  # configuration c1 | c2 | c3 ("" = c2, the paper's Figure 1 setting, 0.75M in its count)
    m: int | None = None  # filter atoms per 3x3 conv; None = the configuration's (c1: 6, c2/c3: 9)
    m1: int | None = None  # sub-atoms per atom, 0 = plain atoms; None = the configuration's (c3: 3, else 0)
    m_c: int | None = None  # Kronecker atoms per attention matrix; None = the configuration's (c1: 6, c2/c3: 9)
    kc: int | None = None  # Kronecker atom size kc x kc; None = the configuration's (c1: 4, c2/c3: 8)
    tune_coefficients: bool = False  # paper's C4: conv atom coefficients trainable too; overfits (Table 2)

    def conv_config(self) -> FilterAtomsConfig:
        return FilterAtomsConfig(m=self.m, m1=self.m1, tune_coefficients=self.tune_coefficients)

    def matrix_config(self) -> KronAtomsConfig:
        return KronAtomsConfig(m_c=self.m_c, kc=self.kc)


ATOMS = declare(
    Declaration(
        name="atoms",
        description="Filter subspace (paper configurations c1/c2/c3): filter atoms on 3x3 convs + Kronecker atoms on attention",
        config_cls=AtomsConfig,
        presets={name: join_patterns(CONVS, ATTENTION) for name in CONFIGURATIONS},
        default_preset="c2",
        train_defaults=TRAIN_DEFAULTS,
    )
)
