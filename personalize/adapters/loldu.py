"""LoLDU (loldu.txt §III, Algorithm 1): train a diagonal between frozen triangular LDU factors.

LU with partial pivoting `W0 = P L U'`, `D = diag(U')`, `U = D^-1 U'`. With `L_r = L[:, :r]`,
`U_r = U[:r]`, `z0 = D[:r]` the update is

    delta = P L_r diag(sigma * z - sigma0 * z0) U_r        # z = z0, sigma = sigma0 at init

`P L_r` is one precomputed buffer. The pivot permutation is saved with the adapter because the
LU pivot choice can differ across devices; on load the factorisation is redone with that pivot.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import UserError
from .base import LayerAdapter, Method, register, weight_2d
from .declarations.loldu import INITS, LOLDU, UNIFORM_NOTE, LoLDUConfig
from .decompositions import cached
from .factors import compose

log = logging.getLogger(__name__)


class LoLDULayer(LayerAdapter):
    saved_buffers = ("perm",)

    def __init__(self, layer: nn.Module, config: LoLDUConfig, saved: dict[str, torch.Tensor]) -> None:
        super().__init__()
        w = weight_2d(layer)  # (out, in)
        rank = min(config.rank, min(w.shape))
        factors = truncated_ldu(layer, rank, saved.get("perm"))
        self.register_buffer("perm", factors["perm"], persistent=False)  # (out,) rows of L forming P @ L
        self.register_buffer("pl", factors["pl"], persistent=False)  # (out, r)
        self.register_buffer("u", factors["u"], persistent=False)  # (r, in)
        z0 = factors["d"]  # (r,)
        sigma0 = torch.tensor(config.alpha / rank, device=w.device)
        self.register_buffer("z0", z0, persistent=False)
        self.register_buffer("sigma0", sigma0, persistent=False)
        z_init = z0.clone() if config.init == "ldu" else torch.empty_like(z0).uniform_(-1.0, 1.0)
        self.z = nn.Parameter(z_init)  # (r,)
        self.sigma = nn.Parameter(sigma0.clone())  # ()
        self.weight_shape = tuple(layer.weight.shape)

    def delta_factors(self) -> list[torch.Tensor]:
        coeff = self.sigma * self.z - self.sigma0 * self.z0  # (r,)
        return [self.pl, coeff, self.u]  # (out, r), (r,), (r, in)

    def delta_weight(self) -> torch.Tensor:
        return compose(self.delta_factors()).reshape(self.weight_shape)  # (out, r) @ (r, in)


def truncated_ldu(layer: nn.Module, rank: int, perm: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The first `rank` columns of `P @ L` ("pl", float32), rows of the unit upper `U` ("u"), entries of
    `D` ("d") and the row order ("perm") of the layer's weight, from the cache when there. A pivot
    order saved with an adapter is honoured: the cached factors serve it when their order is the same."""

    def compute(order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        w = weight_2d(layer).double()
        (pl, row_order), unit_u, diag = ldu_factors(w, None if order is None else order.to(w.device))
        return {
            "perm": row_order,
            "pl": pl[:, :rank].float().contiguous(),
            "u": unit_u[:rank].float().contiguous(),
            "d": diag[:rank].float().contiguous(),
        }

    factors = cached("ldu", {"rank": rank}, [layer.weight], compute)
    if perm is None or torch.equal(factors["perm"].cpu(), perm.cpu().to(factors["perm"].dtype)):
        return factors
    return compute(perm)


def ldu_factors(w: torch.Tensor, perm: torch.Tensor | None) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Return ((P @ L, perm), unit upper U, D) for `w (out, in)` in float64.

    `perm` is such that `P @ L == L[perm]`. With a given `perm`, the rows are reordered first and the
    factorisation is done without further pivoting, so the factors match the saved ones.
    """
    if perm is None:
        p, lower, upper = torch.linalg.lu(w)  # (out, out), (out, k), (k, in)
        perm = p.argmax(dim=1)
    else:
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(len(perm), device=perm.device)
        lower, upper = lu_no_pivot(w[inverse])
    diag = torch.diagonal(upper).clone()  # (k,)
    safe = torch.where(diag == 0, torch.ones_like(diag), diag)
    unit_upper = upper / safe[:, None]
    return (lower[perm], perm), unit_upper, diag


def lu_no_pivot(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LU of `a` that keeps the row order: LAPACK's result when it needs no swap, else Doolittle."""
    p, lower, upper = torch.linalg.lu(a)
    if torch.equal(p, torch.eye(p.shape[0], dtype=p.dtype, device=p.device)):
        return lower, upper
    rows, cols = a.shape
    k = min(rows, cols)
    work = a.clone()
    lower = torch.zeros(rows, k, dtype=a.dtype, device=a.device)
    for j in range(k):
        pivot = work[j, j]
        if pivot == 0:
            raise UserError(
                "LoLDU: saved pivot order gives a zero pivot on this base model; was the adapter trained on another base model?"
            )
        lower[j:, j] = work[j:, j] / pivot
        work[j + 1 :, j:] -= lower[j + 1 :, j : j + 1] * work[j, j:]
    return lower, torch.triu(work[:k])


@register
class LoLDU(Method):
    declaration = LOLDU
    layer_cls = LoLDULayer

    @classmethod
    def build_layers(
        cls,
        layers: dict[str, nn.Module],
        config: LoLDUConfig,
        saved: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, LayerAdapter]:
        if saved is None and config.init == "uniform":  # a loaded adapter brings its trained z instead
            log.warning("loldu: %s", UNIFORM_NOTE)
        for name, layer in layers.items():
            perm = (saved or {}).get(name, {}).get("perm")
            rows = layer.weight.shape[0]
            if perm is not None and not (
                perm.dim() == 1 and not perm.is_floating_point() and torch.equal(perm.sort().values.long(), torch.arange(rows))
            ):
                raise UserError(f"LoLDU pivot order 'perm' of layer '{name}' must be a permutation of its {rows} rows")
        return super().build_layers(layers, config, saved)

    @classmethod
    def validate(cls, config: LoLDUConfig) -> None:
        if config.rank < 1:
            raise UserError(f"loldu rank must be a positive integer, got {config.rank}")
        if config.init not in INITS:
            raise UserError(f"loldu init must be one of {', '.join(INITS)}, got '{config.init}'")

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: LoLDUConfig) -> int:
        return min(config.rank, min(weight_2d(layer).shape)) + 1
