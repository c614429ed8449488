"""Truncated SVD of a weight update into LoRA factors, with the rank chosen by an energy threshold,
a fixed cap, or both.

A matrix `M (m, n)` is factored as `M ~ up @ down`, `up (m, r)`, `down (r, n)`, from its top-r
singular triplets (the best rank-r approximation in the Frobenius norm, Eckart-Young), with the
singular values split evenly between the factors (`up = U_r sqrt(S_r)`, `down = sqrt(S_r) V_r^T`)
so that neither factor has a large dynamic range when it is stored in float16.

The decomposition is the eigen-decomposition of the float64 Gram matrix of the short side
(`M M^T` for wide matrices, `M^T M` for tall ones): conv updates flattened to `(out, in*k*k)` are
very wide, and this costs one thin matmul plus a `min(m, n)`-sized `eigh` instead of an SVD of the
whole matrix. The eigenvalues are the squared singular values with an error of about float64
epsilon times the largest one, so singular values are resolved down to ~1e-8 of the largest,
below the float32 resolution of the update itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

WORK_DTYPE = torch.float64


@dataclass
class LowRank:
    """`up @ down` approximates the matrix."""

    up: torch.Tensor  # (m, r) float64
    down: torch.Tensor  # (r, n) float64
    full_rank: int  # min(m, n): the largest rank any factorisation of this shape can have
    matrix_rank: int  # the matrix's own (numerical) rank: below it, `up @ down` is a truncation

    @property
    def rank(self) -> int:
        return self.up.shape[1]


def validate_rank_energy(rank: int | None, energy: float | None) -> None:
    """`rank` must be a positive integer and `energy` a number in (0, 1], where given."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UserError(f"rank must be a positive integer (the largest LoRA rank per layer), got {rank!r}")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < float(energy) <= 1.0:
            raise UserError(
                f"energy must be a number in (0, 1] (share of each layer's squared Frobenius norm to keep, e.g. 0.99), got {energy!r}"
            )


def work_device(tensor: torch.Tensor) -> torch.device:
    """The tensor's device, except MPS (no float64 there): the CPU instead."""
    return torch.device("cpu") if tensor.device.type == "mps" else tensor.device


def squared_singular_values(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(matrix in float64, s^2 descending (k,), eigenvectors (k, k)) for `matrix (m, n)`, k = min(m, n).

    The eigenvectors are the left singular vectors when m <= n, the right ones otherwise.
    """
    work = matrix.detach().to(work_device(matrix), WORK_DTYPE)
    gram = work @ work.T if work.shape[0] <= work.shape[1] else work.T @ work  # (k, k)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    return work, values.flip(0).clamp_min(0.0), vectors.flip(1)


def numerical_rank(s2: torch.Tensor) -> int:
    """How many squared singular values stand above the float64 rounding of the Gram matrix."""
    if s2.numel() == 0 or s2[0] <= 0:
        return 0
    tolerance = s2[0] * s2.numel() * torch.finfo(WORK_DTYPE).eps
    return int((s2 > tolerance).sum())


def choose_rank(s2: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank to keep: the smallest r whose top-r s_i^2 hold at least `energy` of the total
    (all of them without `energy`), at most `rank`, and never above the numerical rank (the rest
    is rounding noise)."""
    limit = numerical_rank(s2)
    if rank is not None:
        limit = min(limit, rank)
    if energy is None or limit == 0:
        return limit
    share = torch.cumsum(s2, 0) / s2.sum()
    return min(int((share < energy).sum()) + 1, limit)


def factorize(matrix: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LowRank:
    """Balanced LoRA factors of `matrix (m, n)` at an energy threshold and/or a rank cap (see `choose_rank`)."""
    work, s2, vectors = squared_singular_values(matrix)
    m, n = work.shape
    r = choose_rank(s2, rank, energy)
    basis = vectors[:, :r]  # (k, r) orthonormal
    if m <= n:
        projected = basis.T @ work  # (r, n) = S_r V_r^T
        sigma = projected.norm(dim=1)  # (r,)
        root = sigma.sqrt()
        up, down = basis * root, projected / root[:, None]
    else:
        projected = work @ basis  # (m, r) = U_r S_r
        sigma = projected.norm(dim=0)
        root = sigma.sqrt()
        up, down = projected / root, (basis * root).T
    return LowRank(up=up, down=down, full_rank=min(m, n), matrix_rank=numerical_rank(s2))
