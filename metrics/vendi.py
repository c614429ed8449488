"""Vendi score: the effective number of distinct items in a set, from the eigenvalues of its cosine kernel."""

from __future__ import annotations

import math

import numpy as np

from metrics.matrix import as_float64_matrix, l2_normalize_rows


def similarity_eigenvalues(x: object) -> np.ndarray:
    """Positive eigenvalues of K / n, K = X X^T over L2-normalised rows of `x` (n, d); they sum to 1.

    K / n (n x n, primal) and X^T X / n (d x d, dual) share their non-zero eigenvalues, so the
    smaller of the two is decomposed.
    """
    x = l2_normalize_rows(as_float64_matrix(x, "x"), "x")  # (n, d)
    n, d = x.shape
    gram = (x @ x.T) if n <= d else (x.T @ x)  # (n, n) or (d, d)
    eigenvalues = np.linalg.eigvalsh(gram / n)
    return eigenvalues[eigenvalues > 0]


def vendi_score(x: object, q: float = 1.0) -> float:
    """Vendi score of order `q` of the rows of `x` (n, d), with the cosine kernel.

    q = 1: exp(-sum l log l) (Shannon); q = inf: 1 / max l; other q >= 0: exp(log(sum l^q) / (1 - q)).
    n identical rows give 1.0, n orthonormal rows give n.
    """
    if not (q >= 0):
        raise ValueError(f"Vendi order q must be a number >= 0 (or math.inf), got {q!r}")
    eigenvalues = similarity_eigenvalues(x)
    if q == 1:
        return float(math.exp(-np.sum(eigenvalues * np.log(eigenvalues))))
    if math.isinf(q):
        return float(1.0 / eigenvalues.max())
    return float(math.exp(math.log(np.sum(eigenvalues**q)) / (1.0 - q)))
