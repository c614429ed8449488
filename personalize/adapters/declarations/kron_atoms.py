"""Kronecker atoms' options and defaults (the method: `personalize/adapters/kron_atoms.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import ATTENTION, FEED_FORWARD, PROJECTIONS, AdapterConfig, Declaration, declare, join_patterns
from .filter_atoms import TRAIN_DEFAULTS


@dataclass
class KronAtomsConfig(AdapterConfig):
    m_c: int = 9  # atoms per matrix; paper configuration C2 (Table 9: m = 9, k_c = 8)
    kc: int = 8  # atom size kc x kc; C2 (Table 9); divides every SD 1.x/2.x/XL attention width


KRON_ATOMS = declare(
    Declaration(
        name="kron_atoms",
        description="Kronecker atoms: tunes only the kc x kc atoms of each attention projection",
        config_cls=KronAtomsConfig,
        presets={
            "attention": ATTENTION,
            "attention_proj": join_patterns(ATTENTION, PROJECTIONS),
            "attention_proj_ff": join_patterns(ATTENTION, PROJECTIONS, FEED_FORWARD),
        },
        train_defaults=TRAIN_DEFAULTS,
    )
)
