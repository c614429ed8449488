"""Input checking for the pure math modules: turn embeddings into float64 NumPy matrices."""

from __future__ import annotations

import numpy as np


def as_float64_matrix(x: object, name: str) -> np.ndarray:
    """Return `x` (NumPy array, torch tensor or nested list) as a finite float64 (n, d) matrix."""
    if hasattr(x, "detach"):  # a torch tensor; converted without importing torch here
        x = x.detach().cpu().double().numpy()
    matrix = np.asarray(x, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) matrix of embeddings, got shape {matrix.shape}")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {matrix.shape}); at least one row and one column are needed")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return matrix


def l2_normalize_rows(x: np.ndarray, name: str) -> np.ndarray:
    """Divide each row of an (n, d) matrix by its Euclidean norm; zero rows are refused."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    if (norms == 0).any():
        raise ValueError(f"{name} has an all-zero row; its cosine similarity is undefined")
    return x / norms
