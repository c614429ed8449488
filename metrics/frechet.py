"""Frechet distance between two feature sets modelled as Gaussians (FID when the features are Inception's)."""

from __future__ import annotations

import numpy as np

from metrics.matrix import as_float64_matrix


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite (d, d) matrix via its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)  # (d,), (d, d)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T  # (d, d)


def check_frechet_sizes(n_a: int, n_b: int, dim: int) -> None:
    """Refuse set sizes for which a (dim, dim) covariance is singular (n <= dim), suggesting KID."""
    if n_a <= dim or n_b <= dim:
        raise ValueError(
            f"FID needs more images than the feature dimension ({dim}) in each set, got {n_a} and {n_b}: "
            "the covariance is singular and the value would be meaningless. Use KID (metric 'kid') for "
            "small sets; FID is usually reported on thousands of images."
        )


def frechet_distance(feats_a: object, feats_b: object) -> float:
    """||mu_a - mu_b||^2 + tr S_a + tr S_b - 2 tr sqrt(S_a^1/2 S_b S_a^1/2), in float64.

    Each set needs more rows than the feature dimension, otherwise its covariance is singular and
    the distance is meaningless: that is refused with a ValueError that suggests KID instead.
    """
    a = as_float64_matrix(feats_a, "feats_a")  # (n_a, d)
    b = as_float64_matrix(feats_b, "feats_b")  # (n_b, d)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    check_frechet_sizes(a.shape[0], b.shape[0], a.shape[1])
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)  # (d,), (d,)
    cov_a = np.cov(a, rowvar=False)  # (d, d)
    cov_b = np.cov(b, rowvar=False)  # (d, d)
    sqrt_a = _symmetric_sqrt(cov_a)  # (d, d)
    middle = sqrt_a @ cov_b @ sqrt_a  # (d, d), symmetric PSD
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
