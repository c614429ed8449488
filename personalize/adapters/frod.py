"""FRoD (frod.txt, Method; ADAPTERS.md §5): full-rank updates in a basis shared by a group of layers.

Layers with the same role and weight shape (SD UNet: attn1|attn2, projection, in, out) are decomposed
jointly in float64 (hierarchical joint decomposition). With the group stacked, `[W_1; ..; W_L] = Q R`,

    T = mean_i inv(Q_i^T Q_i + pi I) = Z Lambda Z^T,   V^T = Z^T R,   B_i = Q_i Z,
    Sigma_i = column norms of B_i,   U_i = B_i / Sigma_i,   so   W_i = U_i diag(Sigma_i) V^T.

Each layer trains a vector `dsigma_i (n,)` and the values of a sparse off-diagonal `S_i (n, n)` whose
seeded index pattern is saved with the adapter:

    delta_i = U_i (diag(dsigma_i) + S_i) V^T        # zero at init (dsigma = 0, S = 0)

Memory: storing U_i costs as much as W_i. Since U_i = W_i P diag(1/Sigma_i) with P = V^{-T}, the
update is computed from the frozen weight itself,

    delta_i = W_i @ (P @ K_i @ V^T),   K_i = diag(1/Sigma_i) (diag(dsigma_i) + S_i),

so a group keeps only P and V^T (n, n) and a layer only its index pattern and 1/Sigma_i
(docs/frod-memory.md has the measured sizes and the conditioning).

How the decomposition is computed (the same result as the literal steps, checked against them in
tests/test_frod.py, without a QR of the tall stack; for six 1280-wide layers that QR takes 5.1 s on
one CPU thread, the Grams and Cholesky factor below 1.5 s, and the Grams are needed for T anyway):
R is the Cholesky factor of the stack's Gram matrix G = sum_i G_i, G_i = W_i^T W_i (thin QR's R up
to the signs of its rows, which V^T absorbs), and T = R mean_i inv(G_i + pi G) R^T, which equals
mean_i inv(Q_i^T Q_i + pi I) for Q_i = W_i R^{-1}. A ridge of 1e-8 times G's mean eigenvalue keeps R
invertible when the stack has rank < n (e.g. a single cross-attention to_k with out < in); latent
directions outside the stack's row space then get Sigma ~ 0 and are left untrained (see DEAD).
Unlike one released version of the original code, the adapter starts at W0 exactly (no second
copy of the reconstruction added on top of the base layer).
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from .base import (
    SHARED_KEY,
    AdapterConfig,
    DeltaSlot,
    LayerAdapter,
    Method,
    Slot,
    TrainDefaults,
    register,
    scaled,
    weight_2d,
)

log = logging.getLogger(__name__)

RIDGE = 1e-8  # ridge on the stack's Gram matrix, relative to its mean eigenvalue (keeps R invertible)
# A latent direction j of layer i gets no update when Sigma_ij <= DEAD * |W_i|_F * |P e_j|: float32 cannot
# resolve it (it lies outside the row space of a rank-deficient stack, or W_i is zero).
DEAD = 1e-6
MAX_DENSITY = 0.5  # beyond this S is no longer sparse (and floor(s n^2) could exceed the off-diagonal)
MAX_WIDTH = 4096  # n of the (n, n) matrices per group and step; SDXL cross-attention has n = 2048
ON_AXIS, OFF_AXIS = "on_axis", "off_axis"

# Containers that repeat a unit in diffusers UNets (and most transformer stacks); a layer's role is its
# path inside the innermost one: `up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k` -> `attn2.to_k`.
_REPEATED_UNIT = re.compile(r"^(?:.*\.)?[A-Za-z_]*(?:blocks|layers|layer|attentions|resnets|samplers)\.\d+\.")


@dataclass
class FRoDConfig(AdapterConfig):
    density: float = 0.01  # s = nnz(S_i) / n^2: the paper's main setting FRoD(s=0.01) (Table 2)
    pi: float = 1e-3  # regulariser in T = mean_i inv(Q_i^T Q_i + pi I) (ADAPTERS.md §5, frod.txt Eq. 3)
    seed: int = 0  # seeds the index pattern of each S_i (the pattern itself is saved with the adapter)


def layer_role(name: str) -> str:
    """The module's path inside its innermost repeated unit (the whole name when there is none)."""
    return _REPEATED_UNIT.sub("", name)


def group_key(name: str, layer: nn.Module) -> str:
    """Layers with equal keys share a basis: same role, same layer type, same weight shape."""
    shape = "x".join(str(d) for d in layer.weight.shape)
    return f"{layer_role(name)}:{type(layer).__name__}:{shape}"


def group_layers(layers: dict[str, nn.Module]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(group_key(name, layer), []).append(name)
    return groups


def num_off_axis(n: int, density: float) -> int:
    """Trainable entries of S_i: floor(s * n^2)."""
    return math.floor(density * n * n)


@torch.no_grad()
def joint_basis(weights: list[torch.Tensor], pi: float) -> torch.Tensor:
    """Shared `V^T (n, n)` (float64) of the hierarchical joint decomposition of `weights [(out, n)]`."""
    grams = [w.T @ w for w in (w.double() for w in weights)]  # G_i = W_i^T W_i, (n, n)
    gram = torch.zeros_like(grams[0])  # G = stack^T stack = R^T R
    for g in grams:
        gram += g
    mean_eig = gram.diagonal().mean()
    gram.diagonal().add_(RIDGE * mean_eig if mean_eig > 0 else 1.0)
    r = torch.linalg.cholesky(gram).mT  # (n, n) upper triangular; Q_i = W_i R^{-1}
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    h = torch.zeros_like(gram)  # sum_i inv(G_i + pi G); inv(Q_i^T Q_i + pi I) = R inv(G_i + pi G) R^T
    for g in grams:  # (cholesky_solve: torch.cholesky_inverse is ~20x slower with 2 threads on a busy CPU)
        h += torch.cholesky_solve(eye, torch.linalg.cholesky(torch.add(g, gram, alpha=pi)))
    t = r @ (h / len(grams)) @ r.mT  # T (n, n)
    _, z = torch.linalg.eigh((t + t.mT) / 2)  # T = Z Lambda Z^T
    return z.mT @ r  # V^T = Z^T R


def inverse_scales(weight: torch.Tensor, p: torch.Tensor, p_norms: torch.Tensor) -> torch.Tensor:
    """1 / Sigma_i (n,) where Sigma_i = column norms of B_i = W_i P (= Q_i Z), in float32 as the forward
    computes B_i; 0 for dead directions. `p_norms` = column norms of P."""
    weight = weight.float()
    sigma = torch.linalg.vector_norm(weight @ p, dim=0)  # (n,)
    live = sigma > DEAD * torch.linalg.vector_norm(weight) * p_norms
    return torch.where(live, 1.0 / sigma, torch.zeros_like(sigma))


def sample_off_diagonal(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct off-diagonal positions of an (n, n) matrix, uniformly at random, as sorted flat indices."""
    total = n * (n - 1)
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < count:  # draw with replacement, keep distinct; a few rounds even at s = 0.5
        draw = torch.randint(total, (count - chosen.numel() + 64,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    chosen = chosen[torch.randperm(chosen.numel(), generator=generator)[:count]]
    rows, cols = chosen // (n - 1), chosen % (n - 1)
    cols = cols + (cols >= rows).long()  # skip the diagonal
    return torch.sort(rows * n + cols).values


def layer_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


class _FrozenLeftMatmul(torch.autograd.Function):
    """`w @ m` in m's dtype for a frozen `w` (possibly fp16), without keeping a float32 copy of `w` for backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return w.to(m.dtype) @ m

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (w,) = ctx.saved_tensors
        return None, w.to(grad.dtype).T @ grad


class FRoDBasis(nn.Module):
    """Frozen tensors shared by one group: `V^T` and `P = V^{-T}` (float32), one instance per group."""

    def __init__(self, vt: torch.Tensor) -> None:
        super().__init__()
        vt = vt.float()
        # P is derived from the float32 V^T, the tensor the file stores, so a reload rebuilds it bit for bit.
        self.register_buffer("vt", vt, persistent=False)  # (n, n)
        self.register_buffer("p", torch.linalg.inv(vt.double()).float(), persistent=False)  # (n, n)


class FRoDLayer(LayerAdapter):
    """dsigma_i and the values of S_i for one layer; the update is computed from the layer's own W0."""

    saved_buffers = ("s_index",)

    def __init__(
        self,
        group: str,
        basis: FRoDBasis,
        weight_shape: tuple[int, ...],
        inv_sigma: torch.Tensor,  # (n,) 1/Sigma_i, 0 for dead directions
        s_index: torch.Tensor,  # (nnz,) flat off-diagonal positions of S_i's trainable entries
    ) -> None:
        super().__init__()
        n = basis.vt.shape[0]
        self.group, self.basis, self.n = group, basis, n
        self.weight_shape, self.out = weight_shape, weight_shape[0]
        device = basis.vt.device
        diag = torch.arange(n, device=device) * (n + 1)
        k_index = torch.cat([diag, s_index.to(device=device, dtype=torch.long)])  # (n + nnz,) flat positions in K
        self.register_buffer("k_index", k_index, persistent=False)
        self.register_buffer("k_scale", inv_sigma.to(device)[k_index // n], persistent=False)  # 1/Sigma of each row
        self.dsigma = nn.Parameter(torch.zeros(n, device=device))  # (n,) on-axis
        self.s_values = nn.Parameter(torch.zeros(s_index.numel(), device=device))  # (nnz,) off-axis
        self.frozen_weight: Callable[[], torch.Tensor] | None = None  # W0 of the layer, bound by FRoDSlot

    @property
    def s_index(self) -> torch.Tensor:
        """Flat positions of S_i's trainable entries (int32 in the file)."""
        return self.k_index[self.n :].to(torch.int32)

    def param_group(self, name: str) -> str:
        return ON_AXIS if name == "dsigma" else OFF_AXIS

    def delta_factors(self) -> list[torch.Tensor]:
        """`[W0 (out, n), P (n, n), K_i (n, n), V^T (n, n)]`, whose product is the update; W0 in its own dtype."""
        assert self.frozen_weight is not None, "FRoDLayer used outside FRoDSlot"
        n = self.n
        values = torch.cat([self.dsigma, self.s_values]).float() * self.k_scale  # (n + nnz,)
        k = values.new_zeros(n * n).index_put_((self.k_index,), values).view(n, n)  # diag(1/Sigma)(diag(dsigma) + S)
        w = self.frozen_weight().reshape(self.out, n)  # (out, n)
        return [w, self.basis.p.float(), k, self.basis.vt.float()]

    def delta_weight(self) -> torch.Tensor:
        return compose_update(self.delta_factors()).reshape(self.weight_shape)


def compose_update(factors: list[torch.Tensor]) -> torch.Tensor:
    """`W0 @ P @ K @ V^T` (out, n) in float32, in an order whose backward needs only the frozen tensors."""
    w, p, k, vt = factors
    out, n = w.shape
    if out >= n:  # 2 n^3 + out n^2 multiply-adds
        return _FrozenLeftMatmul.apply(w, p @ (k @ vt))
    return _FrozenLeftMatmul.apply(w, p @ k) @ vt  # n^3 + 2 out n^2


class FRoDSlot(DeltaSlot):
    """DeltaSlot that hands the adapter the layer's W0 (the kept original while merged) and composes
    the update in `compose_update`'s order; where the layer sees few tokens (wide, low-resolution
    blocks) it applies the factors to the activations instead (`DeltaSlot.prefers_activations`)."""

    def __init__(self, base: nn.Module, adapter: FRoDLayer) -> None:
        super().__init__(base, adapter)
        adapter.frozen_weight = self.frozen_weight

    def frozen_weight(self) -> torch.Tensor:
        return (self.base.weight if self.original_weight is None else self.original_weight).detach()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        base, adapter = self.base, self.adapter
        if not self.live or adapter.scale == 0.0:
            return self._run(x, base.weight)
        factors = adapter.delta_factors()
        if self.prefers_activations(x, factors):
            return self._run(x, base.weight) + self._run_factors(x, scaled(factors, adapter.scale))
        with torch.autocast(device_type=base.weight.device.type, enabled=False):  # compose in float32
            delta = compose_update(factors).view(base.weight.shape)
        return self._run(x, torch.add(base.weight, delta.to(base.weight.dtype), alpha=adapter.scale))


def decomposition_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # MPS has no float64


@register
class FRoD(Method):
    name = "frod"
    description = "FRoD: full-rank updates in a basis shared by same-role layers, diagonal + sparse rotations"
    config_cls = FRoDConfig
    layer_cls = FRoDLayer
    train_defaults = TrainDefaults(
        lr=5e-4,
        steps=1000,
        source="frod.txt Table 8 (released settings): lr(Sigma) 5e-4, lr(S) 5e-5; "
        "the paper has no SD setting, steps as the other methods",
    )
    group_lr_ratio = {ON_AXIS: 1.0, OFF_AXIS: 0.1}  # lr(S) = lr(dsigma) / 10 (frod.txt Appendix E, Table 8)

    @classmethod
    def validate(cls, config: FRoDConfig) -> None:
        if not (is_number(config.density) and 0.0 <= config.density <= MAX_DENSITY):
            raise UserError(
                f"frod density must be a number between 0 and {MAX_DENSITY} (the fraction of S entries trained), "
                f"got {config.density!r}"
            )
        if not (is_number(config.pi) and math.isfinite(config.pi) and config.pi > 0):
            raise UserError(f"frod pi must be a positive number (paper: 1e-3), got {config.pi!r}")
        if not (isinstance(config.seed, int) and not isinstance(config.seed, bool) and config.seed >= 0):
            raise UserError(f"frod seed must be a non-negative integer, got {config.seed!r}")

    @classmethod
    def build_layers(
        cls,
        layers: dict[str, nn.Module],
        config: FRoDConfig,
        saved: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, FRoDLayer]:
        shared = None if saved is None else saved.get(SHARED_KEY, {})
        adapters: dict[str, FRoDLayer] = {}
        for group, names in group_layers(layers).items():
            weights = [weight_2d(layers[name]) for name in names]  # (out, n) each
            device, n = weights[0].device, weights[0].shape[1]
            if n > MAX_WIDTH:
                raise UserError(
                    f"frod keeps (n, n) matrices per layer group; layer '{names[0]}' has n = {n} inputs "
                    f"(in * k * k for a convolution); accepted: n <= {MAX_WIDTH}, e.g. attention projections"
                )
            work = decomposition_device(device)
            if shared is None:
                vt = joint_basis([w.to(work) for w in weights], config.pi)
            else:
                vt = shared.get(f"{group}.vt")
                if vt is None or tuple(vt.shape) != (n, n):
                    raise UserError(
                        f"adapter file has no FRoD basis of shape ({n}, {n}) for layer group '{group}'; "
                        "was it saved for another model?"
                    )
            basis = FRoDBasis(vt.to(work))
            p_norms = torch.linalg.vector_norm(basis.p, dim=0)  # (n,)
            inv_sigmas = [inverse_scales(w.to(work), basis.p, p_norms) for w in weights]
            basis = basis.to(device)
            count = num_off_axis(n, config.density)
            log.debug("frod group %s: %d layer(s), n=%d", group, len(names), n)
            for name, inv_sigma in zip(names, inv_sigmas):
                if shared is None:
                    s_index = sample_off_diagonal(n, count, layer_generator(config.seed, name))
                else:
                    s_index = check_index(saved.get(name, {}).get("s_index"), n, count, name)
                adapters[name] = FRoDLayer(group, basis, tuple(layers[name].weight.shape), inv_sigma, s_index)
        return adapters

    @classmethod
    def attach_layers(
        cls,
        layers: dict[str, nn.Module],
        config: FRoDConfig,
        saved: dict[str, dict[str, torch.Tensor]] | None = None,
        root: nn.Module | None = None,
    ) -> dict[str, Slot]:
        adapters = cls.build_layers(layers, config, saved)
        return {name: FRoDSlot(layers[name], adapters[name]) for name in layers}

    @classmethod
    def shared_tensors(cls, slots: dict[str, Slot]) -> dict[str, torch.Tensor]:
        return {f"{slot.adapter.group}.vt": slot.adapter.basis.vt for slot in slots.values()}

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: FRoDConfig) -> int:
        n = weight_2d(layer).shape[1]
        return n + num_off_axis(n, config.density)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_index(index: torch.Tensor | None, n: int, count: int, name: str) -> torch.Tensor:
    """A saved S index pattern, checked against the layer it is loaded into."""
    if index is None or index.numel() != count:
        raise UserError(f"adapter file has no FRoD index pattern with {count} entries for layer '{name}'")
    index = index.long()
    if count and (index.min() < 0 or index.max() >= n * n or bool((index // n == index % n).any())):
        raise UserError(f"adapter file's FRoD index pattern for layer '{name}' is not off-diagonal in ({n}, {n})")
    return index
