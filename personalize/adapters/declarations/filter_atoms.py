"""Filter atoms' options and defaults (the method: `personalize/adapters/filter_atoms.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import CONVS, AdapterConfig, Declaration, TrainDefaults, declare, join_patterns

# The UNet's first and last convs (latent <-> feature channels); optional (ADAPTERS.md §1).
CONV_IO = r"^(conv_in|conv_out)$"

# filter-atoms.txt §4.3: AdamW, lr 1e-3 for every parameter-efficient method; 1000 steps as YEH et al.
TRAIN_DEFAULTS = TrainDefaults(lr=1e-3, steps=1000, source="filter-atoms.txt §4.3: AdamW lr 1e-3, 1000 steps (SD few-shot)")


@dataclass
class FilterAtomsConfig(AdapterConfig):
    m: int = 9  # atoms per conv; 9 = k*k for 3x3 (complete), the paper's main setting (Table 1, Table 6, C2)
    m1: int = 0  # sub-atoms per atom; 0 = plain atoms (§3.1), >= 1 = overcomplete (§3.2; C3 uses 3)
    tune_coefficients: bool = False  # paper's C4: alpha trainable too; overfits (Table 2), so off


FILTER_ATOMS = declare(
    Declaration(
        name="filter_atoms",
        description="Filter atoms: tunes only the spatial atoms of each 3x3 conv; channel mixing stays frozen",
        config_cls=FilterAtomsConfig,
        presets={"convs": CONVS, "convs_io": join_patterns(CONVS, CONV_IO)},
        default_preset="convs",
        train_defaults=TRAIN_DEFAULTS,
    )
)
