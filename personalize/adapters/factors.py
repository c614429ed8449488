"""Factor chains: an update given as a product of factors, its cost and its composition.

A chain is a list of tensors whose product, left to right, is an `(out, fan_in)` matrix; a 2-D
factor is a matrix, a 1-D factor a diagonal (SVFit: `[U (out, r), ds (r,), V^T (r, in)]`). The
slots (`slots.py`) use these to compare, in multiply-adds, composing the matrix with passing
activations through the factors, and to compose it in the cheaper of the two orders.
"""

from __future__ import annotations

import torch


def activation_cost(tokens: int, factors: list[torch.Tensor], training: bool) -> int:
    """Multiply-adds of passing `tokens` rows through the factors (and back, with their gradients)."""
    matrices = [f for f in factors if f.dim() == 2]
    cost = tokens * sum(m.numel() for m in matrices)
    if training:
        cost = 2 * cost + tokens * sum(m.numel() for m in matrices if m.requires_grad)
    return cost


def scaled(factors: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """The factors with `scale` folded into the smallest one."""
    if scale == 1.0:
        return factors
    smallest = min(range(len(factors)), key=lambda i: factors[i].numel())
    return [f * scale if i == smallest else f for i, f in enumerate(factors)]


def chain_cost(factors: list[torch.Tensor]) -> int:
    """Multiply-adds of `compose(factors)` (the cheaper of the two orders it tries)."""
    return min(_ordered_cost(factors), _ordered_cost([f.T if f.dim() == 2 else f for f in reversed(factors)]))


def _ordered_cost(factors: list[torch.Tensor]) -> int:
    rows, cols, cost = None, None, 0
    for f in factors:
        if f.dim() == 1:
            cost += 0 if rows is None else rows * f.numel()
            continue
        if rows is None:
            rows, cols = f.shape
        else:
            cost += rows * cols * f.shape[1]
            cols = f.shape[1]
    return cost


def compose(factors: list[torch.Tensor]) -> torch.Tensor:
    """The product of a factor chain (1-D = diagonal) as an (out, fan_in) matrix, in the cheaper order."""
    if _ordered_cost(factors) <= _ordered_cost([f.T if f.dim() == 2 else f for f in reversed(factors)]):
        return _left_to_right(factors)
    return _left_to_right([f.T if f.dim() == 2 else f for f in reversed(factors)]).T


def _left_to_right(factors: list[torch.Tensor]) -> torch.Tensor:
    result, pending = None, None  # pending: diagonals met before the first matrix
    for f in factors:
        if f.dim() == 1:
            if result is None:
                pending = f if pending is None else pending * f
            else:
                result = result * f  # scales the columns
        else:
            if result is None:
                result = f if pending is None else pending[:, None] * f
            else:
                result = result @ f
    assert result is not None, "a factor chain needs at least one matrix"
    return result
