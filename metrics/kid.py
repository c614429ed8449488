"""Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from metrics.matrix import as_float64_matrix


class KernelDistance(NamedTuple):
    """KID over subsets: mean and standard deviation (ddof=1; 0.0 for a single subset)."""

    mean: float
    std: float


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for every row pair of x (n, d) and y (m, d): an (n, m) matrix."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3  # (n, m)


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between x (m, d) and y (m, d) with the polynomial kernel (diagonals excluded)."""
    m = x.shape[0]
    k_xx = polynomial_kernel(x, x)  # (m, m)
    k_yy = polynomial_kernel(y, y)  # (m, m)
    k_xy = polynomial_kernel(x, y)  # (m, m)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    feats_a: object,
    feats_b: object,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
) -> KernelDistance:
    """KID between real features `feats_a` (n_a, d) and generated `feats_b` (n_b, d).

    Each of `subsets` rounds draws `subset_size` rows (default min(n_a, n_b)) without replacement
    from each set and computes the unbiased MMD^2; the result is their mean and std.
    """
    a = as_float64_matrix(feats_a, "feats_a")  # (n_a, d)
    b = as_float64_matrix(feats_b, "feats_b")  # (n_b, d)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    largest = min(a.shape[0], b.shape[0])
    size = largest if subset_size is None else subset_size
    if not 2 <= size <= largest:
        raise ValueError(
            f"KID subset_size must be between 2 and min(n_real, n_generated) = {largest}, got {size}"
            + (" (KID needs at least 2 images in each set)" if largest < 2 else "")
        )
    rng = np.random.default_rng(seed)
    scores = np.array(
        [
            unbiased_mmd2(a[rng.choice(a.shape[0], size, replace=False)], b[rng.choice(b.shape[0], size, replace=False)])
            for _ in range(subsets)
        ]
    )  # (subsets,)
    std = float(scores.std(ddof=1)) if subsets > 1 else 0.0
    return KernelDistance(mean=float(scores.mean()), std=std)
