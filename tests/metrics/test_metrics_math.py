"""Known values and independent cross-checks of the pure math: cosine means, Vendi, Frechet distance, KID."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from metrics.frechet import frechet_distance
from metrics.kid import kernel_inception_distance
from metrics.similarity import mean_pairwise_cosine, pairwise_cosine, rowwise_cosine
from metrics.vendi import vendi_score


def random_matrix(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


# ---- cosine means -------------------------------------------------------------------------------


def test_mean_pairwise_cosine_matches_a_loop_and_ignores_scale():
    a, b = random_matrix(4, 6, 1), random_matrix(5, 6, 2)
    loop = np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x in a for y in b])
    assert mean_pairwise_cosine(a, b) == pytest.approx(loop)
    assert mean_pairwise_cosine(3.0 * a, torch.tensor(b)) == pytest.approx(loop)


def test_mean_pairwise_cosine_exclude_self_drops_the_diagonal():
    a = random_matrix(5, 3)
    cos = pairwise_cosine(a, a)
    expected = (cos.sum() - np.trace(cos)) / 20
    assert mean_pairwise_cosine(a, a, exclude_self=True) == pytest.approx(expected)
    assert mean_pairwise_cosine(a, a) == pytest.approx(cos.mean())
    with pytest.raises(ValueError, match="same size"):
        mean_pairwise_cosine(a, a[:3], exclude_self=True)


def test_cosine_known_values_and_bad_inputs():
    assert mean_pairwise_cosine([[1.0, 0.0]], [[0.0, 2.0], [-3.0, 0.0]]) == pytest.approx(-0.5)
    assert rowwise_cosine([[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [-1.0, 1.0]]) == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="feature dimension"):
        mean_pairwise_cosine(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="all-zero row"):
        mean_pairwise_cosine(np.zeros((1, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="2-D"):
        mean_pairwise_cosine(np.ones(3), np.ones((1, 3)))


# ---- Vendi --------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.5, 1, 2, math.inf])
def test_vendi_known_values(q):
    identical = np.tile(random_matrix(1, 8), (6, 1))
    assert vendi_score(identical, q=q) == pytest.approx(1.0)
    orthonormal = np.linalg.qr(random_matrix(8, 5))[0].T  # (5, 8), orthonormal rows
    assert vendi_score(orthonormal, q=q) == pytest.approx(5.0)
    two_groups = np.array([[1.0, 0.0]] * 3 + [[0.0, 4.0]] * 3)
    assert vendi_score(two_groups, q=q) == pytest.approx(2.0)


def primal_eigenvalues(x: np.ndarray) -> np.ndarray:
    """Eigenvalues of K / n with K = X X^T (n x n) over normalised rows, straight from the definition."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    values = np.linalg.eigvalsh(x @ x.T / len(x))
    return values[values > 0]


@pytest.mark.parametrize("n, d", [(5, 12), (12, 5)])  # the implementation decomposes the smaller Gram matrix
def test_vendi_agrees_with_the_primal_definition(n, d):
    x = random_matrix(n, d, seed=3)
    eig = primal_eigenvalues(x)
    assert vendi_score(x) == pytest.approx(math.exp(-np.sum(eig * np.log(eig))))
    assert vendi_score(x, q=2) == pytest.approx(1.0 / np.sum(eig**2))
    assert vendi_score(x, q=math.inf) == pytest.approx(1.0 / eig.max())
    assert vendi_score(x, q=0.5) == pytest.approx(np.sum(np.sqrt(eig)) ** 2)


def test_vendi_order_is_decreasing_and_q_is_checked():
    x = random_matrix(10, 4, seed=4)
    scores = [vendi_score(x, q=q) for q in (0.1, 0.5, 1, 2, math.inf)]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(ValueError, match="q must be"):
        vendi_score(x, q=-1)


# ---- Frechet ------------------------------------------------------------------------------------


def test_frechet_same_set_is_zero_and_translation_is_shift_squared():
    a = random_matrix(40, 6)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + shift) == pytest.approx(np.sum(shift**2))


def test_frechet_matches_scipy_sqrtm():
    a, b = random_matrix(50, 5, 5), 0.5 * random_matrix(60, 5, 6) @ random_matrix(5, 5, 7) + 1.0
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(torch.tensor(a, dtype=torch.float32), b) == pytest.approx(expected, rel=1e-5)


def test_frechet_refuses_too_few_samples_and_suggests_kid():
    with pytest.raises(ValueError, match=r"feature dimension \(8\).*KID"):
        frechet_distance(random_matrix(8, 8), random_matrix(30, 8))


# ---- KID ----------------------------------------------------------------------------------------


def naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, written as explicit loops."""
    m, d = x.shape
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_full_subset_equals_naive_loop():
    a, b = random_matrix(7, 4, 8), random_matrix(7, 4, 9) + 0.3
    result = kernel_inception_distance(a, b, subsets=3)
    assert result.mean == pytest.approx(naive_mmd2(a, b))
    assert result.std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set, permuted


def test_kid_subsets_follow_the_seed_and_match_the_naive_loop():
    a, b = random_matrix(12, 3, 10), random_matrix(9, 3, 11)
    result = kernel_inception_distance(a, b, subsets=4, subset_size=5, seed=7)
    rng = np.random.default_rng(7)
    scores = [naive_mmd2(a[rng.choice(12, 5, replace=False)], b[rng.choice(9, 5, replace=False)]) for _ in range(4)]
    assert result.mean == pytest.approx(np.mean(scores))
    assert result.std == pytest.approx(np.std(scores, ddof=1))
    assert kernel_inception_distance(a, b, subsets=4, subset_size=5, seed=7) == result


def test_kid_matches_torchmetrics_poly_mmd():
    from torchmetrics.image.kid import poly_mmd

    a, b = random_matrix(10, 6, 12), random_matrix(10, 6, 13) * 1.5
    expected = poly_mmd(torch.tensor(a), torch.tensor(b), degree=3, gamma=None, coef=1.0).item()
    assert kernel_inception_distance(a, b, subsets=1).mean == pytest.approx(expected)


def test_kid_separates_shifted_sets_and_checks_sizes():
    a, same, shifted = random_matrix(200, 4, 14), random_matrix(200, 4, 15), random_matrix(200, 4, 16) + 1.0
    near = kernel_inception_distance(a, same, subsets=5, subset_size=100).mean
    far = kernel_inception_distance(a, shifted, subsets=5, subset_size=100).mean
    assert abs(near) < 0.2 < far
    with pytest.raises(ValueError, match="subset_size must be between 2 and"):
        kernel_inception_distance(a, a[:5], subset_size=6)
    with pytest.raises(ValueError, match="at least 2 images"):
        kernel_inception_distance(a, a[:1])
