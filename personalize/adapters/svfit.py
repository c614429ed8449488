"""SVFit (svfit.txt §III-B): train only the top-r singular values of each frozen weight.

`W0 = U diag(s) V^T`; the update is `delta = U_r diag(ds) V_r^T` with `ds (r,)` zero at init.
Saving only `ds` is safe: `u_i v_i^T` is invariant to the joint sign flip of an SVD pair, so the
basis is recomputed from W0 on load. At full rank with float32 weights the layer may run through
`U diag(s + scale * ds) V^T` alone (`weight_factors`); 16-bit weights always keep W0 in the forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .base import LayerAdapter, Method, register, weight_2d
from .declarations.svfit import SVFIT, SVFitConfig
from .decompositions import cached
from .factors import compose


class SVFitLayer(LayerAdapter):
    def __init__(self, layer: nn.Module, config: SVFitConfig, saved: dict[str, torch.Tensor]) -> None:
        super().__init__()
        w = weight_2d(layer)  # (out, in)
        rank = effective_rank(w.shape, config.rank)
        u, s, vh = singular_value_decomposition(layer)  # (out, k), (k,), (k, in)
        self.register_buffer("u", u[:, :rank].contiguous(), persistent=False)  # (out, r)
        self.register_buffer("vh", vh[:rank].contiguous(), persistent=False)  # (r, in)
        # Full rank: U diag(s) V^T is W0 up to float32 rounding, so the layer may run as U diag(s + ds) V^T
        # alone. Not for 16-bit weights: that form computes in 16 bits, rounding U, s and V^T, and at init
        # would no longer give the base layer's output bit for bit (the W0 forms add an exact zero).
        exact_basis = rank == min(w.shape) and layer.weight.dtype.itemsize >= 4
        self.register_buffer("s", s.contiguous() if exact_basis else None, persistent=False)  # (r,)
        self.ds = nn.Parameter(torch.zeros(rank, device=w.device))  # (r,)
        self.weight_shape = tuple(layer.weight.shape)

    def delta_factors(self) -> list[torch.Tensor]:
        return [self.u, self.ds, self.vh]  # (out, r), (r,), (r, in)

    def weight_factors(self, scale: float) -> list[torch.Tensor] | None:
        if self.s is None:  # a truncated basis does not reproduce W0; 16-bit weights keep the exact path
            return None
        return [self.u, self.s + scale * self.ds, self.vh]  # (out, r), (r,), (r, in)

    def delta_weight(self) -> torch.Tensor:
        return compose(self.delta_factors()).reshape(self.weight_shape)  # (out, r) @ (r, in)


def singular_value_decomposition(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD `U (out, k), s (k,), V^T (k, in)` of the layer's weight in float32, from the cache when there."""

    def compute() -> dict[str, torch.Tensor]:
        return dict(zip(("u", "s", "vh"), torch.linalg.svd(weight_2d(layer).float(), full_matrices=False)))

    parts = cached("svd", {}, [layer.weight], compute)
    return parts["u"], parts["s"], parts["vh"]


def effective_rank(shape: tuple[int, ...], rank: int | None) -> int:
    full = min(shape)
    return full if rank is None else min(rank, full)


@register
class SVFit(Method):
    declaration = SVFIT
    layer_cls = SVFitLayer

    @classmethod
    def validate(cls, config: SVFitConfig) -> None:
        if config.rank is not None and config.rank < 1:
            raise UserError(f"svfit rank must be a positive integer or None (full rank), got {config.rank}")

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: SVFitConfig) -> int:
        return effective_rank(weight_2d(layer).shape, config.rank)
