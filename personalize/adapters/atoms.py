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

from typing import Any

from torch import nn

from ..errors import UserError
from ..options import coerce_options
from .base import Method, register
from .declarations.atoms import ATOMS, CONFIGURATIONS, AtomsConfig
from .filter_atoms import FilterAtoms, is_spatial_conv
from .kron_atoms import KronAtoms


@register
class Atoms(Method):
    declaration = ATOMS

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
