"""Kronecker atoms (filter-atoms.txt §3.2-3.3, Table 6): filter atoms for linear and 1x1-conv layers.

`W0 (out, in)` is viewed as `(out/kc) x (in/kc)` blocks of size `kc x kc` and written as
`W0 = sum_i A_i kron B_i` with coefficients `A_i (out/kc, in/kc)` and atoms `B_i (kc, kc)`.
The Van Loan rearrangement `R(W0)` has one row per block (the flattened block, `kc*kc` columns);
its SVD `R = U S V^T` gives `A_i = s_i u_i`, `B_i = v_i`, exact when `m_c = kc*kc`. Tuning the
first `m_c` atoms, `B_i -> B_i + dB_i`, is

    R(delta) = R(W0) @ (V_mc @ dB)        # dB (m_c, kc*kc), zeros at init

so, as for conv filter atoms, the coefficients are never stored: the layer keeps `V_mc` and reads
W0 from the layer. `out` and `in` must be divisible by `kc`. The basis is saved with the adapter
for the reason given in filter_atoms.py (SVD vectors are defined only up to sign).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .base import ATTENTION, FEED_FORWARD, PROJECTIONS, AdapterConfig, LayerAdapter, Method, join_patterns, register, weight_2d
from .filter_atoms import TRAIN_DEFAULTS, check_saved_basis, is_spatial_conv, require_int, right_singular_basis


@dataclass
class KronAtomsConfig(AdapterConfig):
    m_c: int = 9  # atoms per matrix; paper configuration C2 (Table 9: m = 9, k_c = 8)
    kc: int = 8  # atom size kc x kc; C2 (Table 9); divides every SD 1.x/2.x/XL attention width


def rearrange(w: torch.Tensor, kc: int) -> torch.Tensor:
    """Van Loan rearrangement: `w (out, in)` -> `(out/kc * in/kc, kc*kc)`, one row per kc x kc block,
    rows in block-row-major order."""
    out, cin = w.shape
    return w.reshape(out // kc, kc, cin // kc, kc).permute(0, 2, 1, 3).reshape(-1, kc * kc)


def unrearrange(r: torch.Tensor, out: int, cin: int, kc: int) -> torch.Tensor:
    """Inverse of `rearrange`: `(out/kc * in/kc, kc*kc)` -> `(out, in)`."""
    return r.reshape(out // kc, cin // kc, kc, kc).permute(0, 2, 1, 3).reshape(out, cin)


class KronAtomsLayer(LayerAdapter):
    """Atom updates `delta_atoms (m_c, kc*kc)` of one linear / 1x1-conv layer, zeros at init."""

    saved_buffers = ("basis",)

    def __init__(self, layer: nn.Module, config: KronAtomsConfig, saved: dict[str, torch.Tensor]) -> None:
        super().__init__()
        weight = layer.weight  # (out, in) or (out, in, 1, 1)
        self.kc = config.kc
        basis = saved.get("basis")
        if basis is None:
            basis = right_singular_basis(rearrange(weight_2d(layer), config.kc))[:, : config.m_c]
        self.register_buffer("basis", basis.to(weight.device, torch.float32).contiguous(), persistent=False)  # (kc*kc, m_c)
        # W0 itself (see FilterAtomsLayer): no copy, and still W0 while the adapter is merged.
        self._base_weight = (weight,)
        self.delta_atoms = nn.Parameter(torch.zeros(config.m_c, config.kc**2, device=weight.device))  # (m_c, kc*kc)

    def delta_weight(self) -> torch.Tensor:
        w0 = self._base_weight[0].detach()
        out = w0.shape[0]
        w = w0.reshape(out, -1)  # (out, in), in W0's dtype
        mix = self.basis @ self.delta_atoms  # (kc*kc, kc*kc)
        blocks = rearrange(w, self.kc) @ mix.to(w.dtype)  # (out/kc * in/kc, kc*kc) = R(delta)
        return unrearrange(blocks, out, w.shape[1], self.kc).float().reshape(w0.shape)


def is_matrix_layer(module: nn.Module) -> bool:
    """A Linear, or a Conv2d with a 1x1 kernel (the linear case)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and not is_spatial_conv(module))


@register
class KronAtoms(Method):
    name = "kron_atoms"
    description = "Kronecker atoms: tunes only the kc x kc atoms of each attention projection"
    config_cls = KronAtomsConfig
    layer_cls = KronAtomsLayer
    presets = {
        "attention": ATTENTION,
        "attention_proj": join_patterns(ATTENTION, PROJECTIONS),
        "attention_proj_ff": join_patterns(ATTENTION, PROJECTIONS, FEED_FORWARD),
    }
    default_preset = "attention"
    train_defaults = TRAIN_DEFAULTS

    @classmethod
    def validate(cls, config: KronAtomsConfig) -> None:
        require_int("kron_atoms", m_c=config.m_c, kc=config.kc)
        if config.kc < 1:
            raise UserError(f"kron_atoms kc (atom size) must be a positive integer, got {config.kc}")
        if not 1 <= config.m_c <= config.kc**2:
            raise UserError(f"kron_atoms m_c must be between 1 and kc*kc = {config.kc**2} (kc={config.kc}), got {config.m_c}")

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return is_matrix_layer(module)

    @classmethod
    def build_layers(cls, layers, config, saved=None):
        saved = saved or {}
        adapters = {}
        for name, layer in layers.items():
            out, cin = weight_2d(layer).shape
            if out % config.kc or cin % config.kc:
                raise UserError(
                    f"kron_atoms kc={config.kc} does not divide layer '{name}' of shape (out={out}, in={cin}); "
                    f"accepted: a kc dividing both (e.g. {', '.join(str(d) for d in common_divisors(out, cin))})"
                )
            layer_saved = saved.get(name, {})
            check_saved_basis(layer_saved, (config.kc**2, config.m_c), name)
            adapters[name] = cls.layer_cls(layer, config, layer_saved)
        return adapters

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: KronAtomsConfig) -> int:
        return config.m_c * config.kc**2


def common_divisors(a: int, b: int, limit: int = 16) -> list[int]:
    """Divisors of both `a` and `b` up to `limit` (for error messages)."""
    return [d for d in range(1, limit + 1) if a % d == 0 and b % d == 0]
