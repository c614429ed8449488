"""Kronecker atoms (filter-atoms.txt §3.2-3.3, Table 6): filter atoms for linear and 1x1-conv layers.

`W0 (out, in)` is viewed as `(out/kc) x (in/kc)` blocks of size `kc x kc` and written as
`W0 = sum_i A_i kron B_i` with coefficients `A_i (out/kc, in/kc)` and atoms `B_i (kc, kc)`.
The Van Loan rearrangement `R(W0)` has one row per block (the flattened block, `kc*kc` columns);
its SVD `R = U S V^T` gives `A_i = s_i u_i`, `B_i = v_i`, exact when `m_c = kc*kc`. Tuning the
first `m_c` atoms, `B_i -> B_i + dB_i`, is

    R(delta) = R(W0) @ (V_mc @ dB)        # dB (m_c, kc*kc), zeros at init

so the layer keeps `V_mc` and the coefficients `C = R(W0) @ V_mc` (recomputed from W0, never
saved; `m_c / kc^2` of W0's size) and never touches W0 again. `out` and `in` must be divisible by
`kc`. The basis is saved with the adapter for the reason given in filter_atoms.py (SVD vectors are
defined only up to sign).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError
from .base import LayerAdapter, Method, register, weight_2d
from .declarations.kron_atoms import KRON_ATOMS, KronAtomsConfig
from .filter_atoms import check_saved_basis, is_spatial_conv, require_int, right_singular_basis
from .forms import Form
from .slots import compute_dtype

# Measured per layer with a fixed rule before forms were timed (SD 1.5 projections, CPU, one thread,
# forward + backward): the activation form wins only where a wide layer sees few tokens: 8.6 ms
# instead of 11.8 for 1280x1280 at 64 tokens, 3.0 instead of 9.9 at 16, but 2.8 instead of 2.3 for
# 640x640 at 64 and 10 instead of 5 at 256 (smaller weights stay in cache, so composing them is
# cheap). Multiply-adds alone favour composing almost everywhere; measuring (`forms.py`) finds these.


def rearrange(w: torch.Tensor, kc: int) -> torch.Tensor:
    """Van Loan rearrangement: `w (out, in)` -> `(out/kc * in/kc, kc*kc)`, one row per kc x kc block,
    rows in block-row-major order."""
    out, cin = w.shape
    return w.reshape(out // kc, kc, cin // kc, kc).permute(0, 2, 1, 3).reshape(-1, kc * kc)


def unrearrange(r: torch.Tensor, out: int, cin: int, kc: int) -> torch.Tensor:
    """Inverse of `rearrange`: `(out/kc * in/kc, kc*kc)` -> `(out, in)`."""
    return r.reshape(out // kc, cin // kc, kc, kc).permute(0, 2, 1, 3).reshape(out, cin)


class KronAtomsLayer(LayerAdapter):
    """Atom updates `delta_atoms (m_c, kc*kc)` of one linear / 1x1-conv layer, zeros at init.

    With the coefficients `C = R(W0) @ V_mc` kept as a buffer (`m_c / kc^2` of W0's size: 9/64 for
    C2), the update is `R(delta) = C @ dB`, i.e. `delta = sum_j A_j kron dB_j` with `A_j = C[:, :, j]`.
    The slot runs it either as a composed weight or, where `forms.choose` finds it faster,
    through the activations: `delta x = sum_j vec(A_j X dB_j^T)` for `X (in/kc, kc)`, with no
    weight-sized temporary and no weight gradient.
    """

    saved_buffers = ("basis",)

    def __init__(self, layer: nn.Module, config: KronAtomsConfig, saved: dict[str, torch.Tensor]) -> None:
        super().__init__()
        weight = layer.weight  # (out, in) or (out, in, 1, 1)
        self.kc = config.kc
        w = weight_2d(layer)  # (out, in)
        basis = saved.get("basis")
        if basis is None:
            basis = right_singular_basis(rearrange(w, config.kc))[:, : config.m_c]
        basis = basis.to(weight.device, torch.float32).contiguous()  # (kc*kc, m_c)
        self.register_buffer("basis", basis, persistent=False)
        out, cin = w.shape
        coefficients = rearrange(w.float(), config.kc) @ basis  # (out/kc * in/kc, m_c)
        self.register_buffer("coefficients", coefficients.view(out // config.kc, cin // config.kc, -1), persistent=False)
        self.weight_shape = tuple(weight.shape)
        self.delta_atoms = nn.Parameter(torch.zeros(config.m_c, config.kc**2, device=weight.device))  # (m_c, kc*kc)

    def delta_weight(self) -> torch.Tensor:
        blocks_out, blocks_in, m_c = self.coefficients.shape
        blocks = self.coefficients.view(-1, m_c) @ self.delta_atoms  # (out/kc * in/kc, kc*kc) = R(delta)
        return unrearrange(blocks, blocks_out * self.kc, blocks_in * self.kc, self.kc).reshape(self.weight_shape)

    def compose_cost(self) -> int:
        return math.prod(self.weight_shape) * self.coefficients.shape[-1]  # C (out/kc * in/kc, m_c) @ dB (m_c, kc*kc)

    def own_forms(self, layer: nn.Module, x: torch.Tensor, training: bool) -> dict[str, Form]:
        """ "activations": the frozen layer plus `sum_j vec(A_j X dB_j^T)`, `tokens x in x m_c x (kc + out/kc)`
        multiply-adds (about 3x when training: the input and atom gradients), no weight gradient."""
        if isinstance(layer, nn.Conv2d):
            return {}  # a 1x1 conv's channels are not the last axis: compose
        blocks_out, blocks_in, m_c = self.coefficients.shape
        kc = self.kc
        tokens = x.numel() // x.shape[-1]
        update = tokens * blocks_in * kc * m_c * (kc + blocks_out)
        frozen = tokens * blocks_out * blocks_in * kc * kc
        cost = 3 * update + 2 * frozen if training else update + frozen
        return {"activations": Form(lambda x: self.through_activations(layer, x), cost)}

    def through_activations(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        blocks_out, blocks_in, m_c = self.coefficients.shape
        kc = self.kc
        tokens = x.numel() // x.shape[-1]
        dtype = compute_dtype(x)
        atoms = (self.delta_atoms * self.scale).view(m_c * kc, kc).to(dtype)  # rows (j, r), columns c
        blocks = x.to(dtype).reshape(tokens, blocks_in, kc)  # X per token: (N, in/kc, kc)
        mixed = blocks @ atoms.T  # X dB_j^T for every j: (N, in/kc, m_c*kc)
        mixed = mixed.view(tokens, blocks_in * m_c, kc).transpose(1, 2).reshape(tokens * kc, -1)  # (N*kc, in/kc*m_c)
        coefficients = self.coefficients.view(blocks_out, -1).to(dtype)  # (out/kc, in/kc*m_c)
        update = (mixed @ coefficients.T).view(tokens, kc, blocks_out).transpose(1, 2)  # (N, out/kc, kc)
        frozen = nn.functional.linear(x, layer.weight, layer.bias)  # (..., out)
        return frozen + update.reshape(frozen.shape)


def is_matrix_layer(module: nn.Module) -> bool:
    """A Linear, or a Conv2d with a 1x1 kernel (the linear case)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and not is_spatial_conv(module))


@register
class KronAtoms(Method):
    declaration = KRON_ATOMS
    layer_cls = KronAtomsLayer

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
