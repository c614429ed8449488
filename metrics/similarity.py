"""Cosine-similarity metrics (DINO, CLIP-I, CLIP-T): means of cosines between embedding rows."""

from __future__ import annotations

import numpy as np

from metrics.matrix import as_float64_matrix, l2_normalize_rows


def pairwise_cosine(a: object, b: object) -> np.ndarray:
    """Cosine similarity of every row of `a` (n, d) with every row of `b` (m, d): an (n, m) matrix."""
    a = l2_normalize_rows(as_float64_matrix(a, "a"), "a")  # (n, d)
    b = l2_normalize_rows(as_float64_matrix(b, "b"), "b")  # (m, d)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    return a @ b.T  # (n, m)


def mean_pairwise_cosine(a: object, b: object, exclude_self: bool = False) -> float:
    """Mean cosine over all (a_i, b_j) pairs; `exclude_self` drops i == j (for a set against itself).

    DINO and CLIP-I are `mean_pairwise_cosine(real, generated)`; the real-image reference value of
    the DreamBooth paper is `mean_pairwise_cosine(real, real, exclude_self=True)`.
    """
    cos = pairwise_cosine(a, b)  # (n, m)
    if not exclude_self:
        return float(cos.mean())
    n, m = cos.shape
    if n != m:
        raise ValueError(f"exclude_self needs two sets of the same size (the same set twice), got {n} and {m}")
    if n < 2:
        raise ValueError("exclude_self needs at least 2 rows: a single row has no pair other than itself")
    off_diagonal = ~np.eye(n, dtype=bool)  # (n, n)
    return float(cos[off_diagonal].mean())


def rowwise_cosine(a: object, b: object) -> np.ndarray:
    """Cosine of each row of `a` (n, d) with the same row of `b` (n, d): a vector (n,) (CLIP-T per image)."""
    a = l2_normalize_rows(as_float64_matrix(a, "a"), "a")  # (n, d)
    b = l2_normalize_rows(as_float64_matrix(b, "b"), "b")  # (n, d)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape for row-wise cosine, got {a.shape} and {b.shape}")
    return np.einsum("nd,nd->n", a, b)  # (n,)
