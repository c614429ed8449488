"""AOFT, reconstructed: approximately orthogonal down/up projections generated from one vector each.

The AOFT paper (ICCV 2025, arXiv 2507.13260; aoft-abstract.txt) is not available here in full.
Its abstract says a single learnable vector generates approximately orthogonal vectors that form
the down/up projections; public summaries of the paper describe the construction built here:

- From `q (n,)`, the `n x n` matrix `Q(q)` has first column `q`, first row
  `(q_0, -q_1, ..., -q_{n-1})` and remaining block `I - q_r q_r^T / (1 + q_0)` (`q_r = q[1:]`).
  For unit-norm `q` it is the rotation taking `e_0` to `q` (orthogonal, det +1). `q` is not
  normalised, so `Q` is only approximately orthogonal. `AO(q) = Q(q)[:, :d]`, built column by
  column without the `n x n` matrix: column 0 is `q`, column `j >= 1` is
  `[-q_j ; e_j - q_r q_j / (1 + q_0)]`.
- A layer `W0 (out, fan_in)` (`fan_in = in*k*k` for a conv) gets
  `delta = AO(q_up) diag(lam) AO(q_down)^T` with `q_up (out,)`, `q_down (fan_in,)`, `lam (d,)`
  (the paper's variant with a scaling vector). Trainable per layer: `out + fan_in + d`.

Our choices, not given by the summaries:
- `lam = 0` at init, so `delta == 0` exactly, as for every method here.
- `q = e_0 + N(0, INIT_STD^2 / n)` per entry, drawn from torch's global RNG (as the other methods'
  random inits): the noise has norm about INIT_STD at any width, so `AO` starts within about 1%
  of orthonormal, `1 + q_0` starts near 2, and layers do not all start on the same basis.
- During training `1 + q_0` is kept at least EPS in magnitude (its sign is kept), so `Q` stays
  finite if `q_0` drifts towards -1.
- `d = 8` by default: the rank of peft's LoRA/DoRA/LoHa/LoKr defaults, so the baselines compare at
  the same update rank; it costs only `d` extra parameters per layer.
- The learning rate comes from a short sweep on the tiny pipeline (the paper's training settings are
  unknown): 30 steps per lr, same photos and seed, change of the fixed-set evaluation loss
  (start 1.1233): lr 3e-4 -0.0002, 1e-3 -0.0009, 3e-3 -0.0050, 1e-2 -0.1157, 3e-2 -0.3236,
  1e-1 -0.3413; LoRA at 10x its default (1e-3) -0.0301. 1e-2 is the smallest lr of the sweep that
  moves AOFT at least as far as LoRA's 30-step rate moves LoRA; the project's defaults are 1/10 of
  the 30-step rate (README), so the default is 1e-3. The tiny UNet has random weights: a sweep on a
  pretrained base model may move this.

The paper's numbers (ViT image classification) are not reproduced here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError
from .base import LayerAdapter, Method, register, weight_2d
from .declarations.aoft import AOFT as AOFT_DECLARATION
from .declarations.aoft import AOFTConfig

INIT_STD = 0.1  # norm of the initial noise on q (per entry: INIT_STD / sqrt(n))
EPS = 1e-2  # smallest magnitude allowed for the denominator 1 + q_0


def generator_matrix(q: torch.Tensor) -> torch.Tensor:
    """The full `Q(q) (n, n)`; for tests and inspection (the adapter builds only `ao(q, d)`)."""
    return ao(q, q.shape[0])


def ao(q: torch.Tensor, d: int) -> torch.Tensor:
    """The first `d` columns of `Q(q)`: `(n, d)`, without forming the `n x n` matrix."""
    n = q.shape[0]
    q0, qr = q[0], q[1:]  # (), (n-1,)
    denom = 1.0 + q0
    denom = torch.where(denom >= 0, denom.clamp_min(EPS), denom.clamp_max(-EPS))  # |1 + q_0| >= EPS, sign kept
    head = q[1:d]  # (d-1,) = q_j for columns j = 1..d-1
    block = torch.eye(n - 1, d - 1, dtype=q.dtype, device=q.device) - qr[:, None] * (head / denom)[None, :]  # (n-1, d-1)
    rest = torch.cat([-head[None, :], block], dim=0)  # (n, d-1)
    return torch.cat([q[:, None], rest], dim=1)  # (n, d)


def initial_vector(n: int, device: torch.device) -> torch.Tensor:
    """`e_0` plus noise of norm about INIT_STD, from torch's global RNG: `(n,)`."""
    q = torch.randn(n, device=device) * (INIT_STD / math.sqrt(n))
    q[0] += 1.0
    return q


class AOFTLayer(LayerAdapter):
    def __init__(self, layer: nn.Module, config: AOFTConfig, saved: dict[str, torch.Tensor]) -> None:
        super().__init__()
        w = weight_2d(layer)  # (out, fan_in)
        out, fan_in = w.shape
        self.d = config.d
        self.q_up = nn.Parameter(initial_vector(out, w.device))  # (out,)
        self.q_down = nn.Parameter(initial_vector(fan_in, w.device))  # (fan_in,)
        self.lam = nn.Parameter(torch.zeros(config.d, device=w.device))  # (d,)
        self.weight_shape = tuple(layer.weight.shape)

    def delta_factors(self) -> list[torch.Tensor]:
        return [ao(self.q_up, self.d), self.lam, ao(self.q_down, self.d).T]  # (out, d), (d,), (d, fan_in)

    def delta_weight(self) -> torch.Tensor:
        up, lam, down_t = self.delta_factors()
        return ((up * lam) @ down_t).reshape(self.weight_shape)  # (out, d) @ (d, fan_in)


@register
class AOFT(Method):
    declaration = AOFT_DECLARATION
    layer_cls = AOFTLayer

    @classmethod
    def validate(cls, config: AOFTConfig) -> None:
        if config.d < 1:
            raise UserError(f"option 'd' of method 'aoft' must be a positive integer, got {config.d}")

    @classmethod
    def build_layers(cls, layers, config, saved=None):
        for name, layer in layers.items():
            limit = min(weight_2d(layer).shape)
            if config.d > limit:
                raise UserError(
                    f"option 'd' of method 'aoft' is {config.d}, above min(out, in) = {limit} of layer '{name}'; "
                    f"accepted: 1..{min(min(weight_2d(m).shape) for m in layers.values())} for these targets"
                )
        return super().build_layers(layers, config, saved)

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: AOFTConfig) -> int:
        out, fan_in = weight_2d(layer).shape
        return out + fan_in + config.d
