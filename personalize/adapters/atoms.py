"""Filter-subspace tuning of a whole UNet in one call (filter-atoms.txt §3.4, Table 2 / Table 9).

`attach(unet, "atoms", preset="c2")` puts filter atoms (filter_atoms.py) on every 3x3 conv of the
ResNet blocks and resamplers and Kronecker atoms (kron_atoms.py) on the attention projections.
Each target layer gets the layer class of its kind: a k x k conv with k > 1 gets FilterAtomsLayer,
a Linear or 1x1 conv gets KronAtomsLayer; the math lives only in those two classes.

Here `preset` names one of the paper's configurations; it sets both the targets and the per-part
options (ADAPTERS.md §2):

    c1: convs m=6;        attention m_c=6, kc=4
    c2: convs m=9;        attention m_c=9, kc=8        (default)
    c3: c2 + overcomplete convs, m1=3

Any option given explicitly overrides the configuration's value (`preset="c1", kc=8`), and
`targets=<regex>` replaces the target layers while keeping the configuration's options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UserError
from ..options import coerce_options
from .base import ATTENTION, CONVS, AdapterConfig, Method, join_patterns, register
from .filter_atoms import TRAIN_DEFAULTS, FilterAtoms, FilterAtomsConfig, is_spatial_conv
from .kron_atoms import KronAtoms, KronAtomsConfig

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


@register
class Atoms(Method):
    name = "atoms"
    description = "Filter subspace (paper configurations c1/c2/c3): filter atoms on 3x3 convs + Kronecker atoms on attention"
    config_cls = AtomsConfig
    presets = {name: join_patterns(CONVS, ATTENTION) for name in CONFIGURATIONS}
    default_preset = "c2"
    train_defaults = TRAIN_DEFAULTS

    @classmethod
    def make_config(cls, options: dict[str, Any]) -> AtomsConfig:
        """Fill every option left at None from the named configuration, then validate."""
        options = coerce_options(cls.config_cls, options, cls.name)  # typed first: 'none' from the CLI is None
        preset = options.get("preset") or cls.default_preset
        if preset not in CONFIGURATIONS:
            raise UserError(f"unknown preset '{preset}' for method 'atoms'; accepted: {', '.join(CONFIGURATIONS)}")
        resolved = {key: value for key, value in CONFIGURATIONS[preset].items() if options.get(key) is None}
        return super().make_config({**options, **resolved})

    @classmethod
    def validate(cls, config: AtomsConfig) -> None:
        FilterAtoms.validate(config.conv_config())
        KronAtoms.validate(config.matrix_config())

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return FilterAtoms.accepts(module) or KronAtoms.accepts(module)

    @classmethod
    def build_layers(cls, layers, config, saved=None):
        convs = {name: layer for name, layer in layers.items() if is_spatial_conv(layer)}
        matrices = {name: layer for name, layer in layers.items() if name not in convs}
        built = FilterAtoms.build_layers(convs, config.conv_config(), saved)
        built.update(KronAtoms.build_layers(matrices, config.matrix_config(), saved))
        return {name: built[name] for name in layers}

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: AtomsConfig) -> int:
        if is_spatial_conv(layer):
            return FilterAtoms.count_trainable(layer, config.conv_config())
        return KronAtoms.count_trainable(layer, config.matrix_config())
