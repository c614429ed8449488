"""FRoD (frod.txt, Method; ADAPTERS.md §5): full-rank updates in a basis shared by a group of layers.

Layers with the same role and weight shape (SD UNet: attn1|attn2, projection, in, out) are decomposed
jointly in float64 (hierarchical joint decomposition). With the group stacked, `[W_1; ..; W_L] = Q R`,

    T = mean_i inv(Q_i^T Q_i + pi I) = Z Lambda Z^T,   V^T = Z^T R,   B_i = Q_i Z,
    Sigma_i = column norms of B_i,   U_i = B_i / Sigma_i,   so   W_i = U_i diag(Sigma_i) V^T.

Each layer trains a vector `dsigma_i (n,)` and the values of a sparse off-diagonal `S_i (n, n)` whose
seeded index pattern is saved with the adapter:

    delta_i = U_i (diag(dsigma_i) + S_i) V^T        # zero at init (dsigma = 0, S = 0)

A layer keeps `B_i = W_i P = U_i diag(Sigma_i)` (P = V^{-T}; as large as W_i, in its dtype) and

    delta_i = B_i @ K_i @ V^T,   K_i = diag(1/Sigma_i) (diag(dsigma_i) + S_i),   S_i sparse,

and runs, per call, the fastest of composing the weight, `B_i ((I + K_i) V^T x)` alone (where
`B_i V^T` rebuilds W_i to float32 rounding) or the frozen layer plus `B_i K_i V^T x`
(`FRoDSlot.forms`, chosen by `forms.choose`; docs/frod-memory.md has the measured sizes, costs and conditioning).

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
import warnings
import zlib

import torch
from torch import nn

from ..errors import UserError
from .base import SHARED_KEY, LayerAdapter, Method, register, weight_2d
from .declarations.frod import FROD, FRoDConfig
from .decompositions import cached, find, weights_digest
from .forms import Form
from .slots import DeltaSlot, Slot, compute_dtype

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


def inverse_scales(b: torch.Tensor, weight: torch.Tensor, p_norms: torch.Tensor) -> torch.Tensor:
    """1 / Sigma_i (n,) where Sigma_i = column norms of `b = B_i = W_i P (= Q_i Z)` (float32); 0 for dead
    directions. `p_norms` = column norms of P."""
    sigma = torch.linalg.vector_norm(b, dim=0)  # (n,)
    live = sigma > DEAD * torch.linalg.vector_norm(weight.float()) * p_norms
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
    """The frozen `V^T (n, n)` (float32) shared by one group, one instance per group."""

    def __init__(self, vt: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vt", vt.float(), persistent=False)  # (n, n)


def inverse_transpose(vt: torch.Tensor) -> torch.Tensor:
    """`P = V^{-T}` (float32), from the float32 V^T the file stores, so a reload rebuilds it bit for bit.
    Needed only to build each layer's `B_i = W_i P`."""
    return torch.linalg.inv(vt.double()).float()  # (n, n)


class FRoDLayer(LayerAdapter):
    """dsigma_i and the values of S_i for one layer, plus its frozen `B_i = W_i P = U_i diag(Sigma_i)`."""

    saved_buffers = ("s_index",)

    def __init__(
        self,
        group: str,
        basis: FRoDBasis,
        weight: torch.Tensor,  # W_i as the layer holds it: (out, n) or (out, in, k, k)
        b: torch.Tensor,  # (out, n) float32: W_i P
        inv_sigma: torch.Tensor,  # (n,) 1/Sigma_i, 0 for dead directions
        rebuilds_w0: bool,  # B_i V^T is W_i to float32 rounding (FULL_FORM_TOLERANCE)
        s_index: torch.Tensor,  # (nnz,) flat off-diagonal positions of S_i's trainable entries
    ) -> None:
        super().__init__()
        n = basis.vt.shape[0]
        self.group, self.basis, self.n = group, basis, n
        self.weight_shape, self.out = tuple(weight.shape), weight.shape[0]
        device = basis.vt.device
        s_index = s_index.to(device=device, dtype=torch.long)
        inv_sigma = inv_sigma.to(device)
        self.register_buffer("b", b.to(device, weight.dtype), persistent=False)  # (out, n), in W0's dtype
        self.register_buffer("inv_sigma", inv_sigma, persistent=False)  # (n,)
        # K_i's entries, the diagonal then S_i's, in one row-major CSR pattern (and its transpose).
        flat = torch.cat([torch.arange(n, device=device) * (n + 1), s_index])  # (n + nnz,)
        order = torch.argsort(flat)  # entry j of the pattern is flat[order[j]]
        rows, cols = flat[order] // n, flat[order] % n
        t_order = torch.argsort(cols * n + rows)  # K_i^T's entries in its row-major order
        self.register_buffer("s_index_flat", s_index, persistent=False)  # (nnz,)
        self.register_buffer("k_order", order, persistent=False)
        self.register_buffer("k_rows", rows, persistent=False)
        self.register_buffer("k_cols", cols, persistent=False)
        self.register_buffer("k_crow", csr_offsets(rows, n), persistent=False)  # (n + 1,) CSR row offsets
        self.register_buffer("k_scale", inv_sigma[rows], persistent=False)  # 1/Sigma of each entry's row
        self.register_buffer("kt_order", t_order, persistent=False)
        self.register_buffer("kt_crow", csr_offsets(cols[t_order], n), persistent=False)
        self.register_buffer("kt_cols", rows[t_order], persistent=False)
        self.dsigma = nn.Parameter(torch.zeros(n, device=device))  # (n,) on-axis
        self.s_values = nn.Parameter(torch.zeros(s_index.numel(), device=device))  # (nnz,) off-axis
        # Where B_i V^T rebuilds W_i to float32 rounding the layer may run as B_i (I + scale K_i) V^T
        # alone (`FRoDSlot.forms`), skipping the matmul with W_i.
        self.rebuilds_w0 = rebuilds_w0

    def k_matrix(self, values: torch.Tensor) -> torch.Tensor:
        """K_i with `values` (in the pattern's order) as a sparse CSR (n, n) matrix."""
        return torch.sparse_csr_tensor(self.k_crow, self.k_cols, values, (self.n, self.n), check_invariants=False)

    def k_matrix_transposed(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.kt_crow, self.kt_cols, values[self.kt_order], (self.n, self.n), check_invariants=False)

    @property
    def s_index(self) -> torch.Tensor:
        """Flat positions of S_i's trainable entries (int32 in the file)."""
        return self.s_index_flat.to(torch.int32)

    def param_group(self, name: str) -> str:
        return ON_AXIS if name == "dsigma" else OFF_AXIS

    def apply_k(self, h: torch.Tensor, scale: float = 1.0, plus_identity: bool = False) -> torch.Tensor:
        """`scale * K_i @ h` (`(I + scale * K_i) @ h` with `plus_identity`) for `h (n, cols)`, with
        K_i = diag(1/Sigma_i)(diag(dsigma_i) + S_i) as one sparse CSR matrix of n + nnz entries
        ((n + nnz) * cols multiply-adds instead of n^2 * cols)."""
        values = torch.cat([self.dsigma, self.s_values])[self.k_order] * self.k_scale * scale  # (n + nnz,)
        if h.device.type in SPARSE_DEVICES:
            return _SparseMatmul.apply(values, h, self, plus_identity)
        moved = h.index_select(0, self.k_cols) * values.to(h.dtype)[:, None]  # (n + nnz, cols)
        return (h if plus_identity else torch.zeros_like(h)).index_add(0, self.k_rows, moved)

    def delta_weight(self) -> torch.Tensor:
        """`B_i @ K_i @ V^T` (= W_i P K_i V^T) in float32; the backward keeps only frozen tensors."""
        right = self.apply_k(self.basis.vt.float())  # K V^T: (n, n)
        return _FrozenLeftMatmul.apply(self.b, right).reshape(self.weight_shape)  # (out, n)


# Where K_i runs as sparse CSR matmuls (measured there: 0.3 ms against 5-8 ms for gather / scatter-add
# per 1280-wide layer and step). Elsewhere it is a gather and a scatter-add, which GPUs do with
# atomics; the CSR path on CUDA has never run here (no GPU), so it is not switched on for it.
SPARSE_DEVICES = ("cpu",)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def csr_offsets(rows: torch.Tensor, n: int) -> torch.Tensor:
    """CSR row offsets (n + 1,) of entries whose sorted row indices are `rows`."""
    return torch.cat([rows.new_zeros(1), torch.bincount(rows, minlength=n).cumsum(0)])


class _SparseMatmul(torch.autograd.Function):
    """`K_i @ h` (or `h + K_i @ h`) in float32 for K_i's `values` and `h (n, cols)`, with gradients for
    both: `K_i^T @ grad` for h and, for the values, `grad @ h^T` sampled at K_i's entries only."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, h: torch.Tensor, layer: "FRoDLayer", plus_identity: bool) -> torch.Tensor:
        ctx.layer, ctx.plus_identity = layer, plus_identity
        ctx.save_for_backward(values, h)
        with torch.autocast(device_type=h.device.type, enabled=False):
            k, h32 = layer.k_matrix(values.float()), h.float()
            return (torch.addmm(h32, k, h32) if plus_identity else k @ h32).to(h.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        values, h = ctx.saved_tensors
        layer: FRoDLayer = ctx.layer
        grad_values = grad_h = None
        with torch.autocast(device_type=grad.device.type, enabled=False):
            grad32 = grad.float()
            if ctx.needs_input_grad[0]:
                pattern = layer.k_matrix(torch.zeros_like(values, dtype=torch.float32))
                sampled = torch.sparse.sampled_addmm(pattern, grad32, h.float().T, beta=0.0)  # (n, n) at K_i's entries
                grad_values = sampled.values().to(values.dtype)
            if ctx.needs_input_grad[1]:
                kt = layer.k_matrix_transposed(values.float())
                grad_h = (torch.addmm(grad32, kt, grad32) if ctx.plus_identity else kt @ grad32).to(h.dtype)
        return grad_values, grad_h, None, None


FULL_FORM_TOLERANCE = 1e-6  # relative |B_i V^T - W_i| below which the layer may skip W_i (float32 rounding)


class FRoDSlot(DeltaSlot):
    """Runs one FRoD layer in one of three exact forms (`forms`), as `forms.choose` picks."""

    def forms(self, x: torch.Tensor, training: bool) -> dict[str, Form]:
        """FRoD's forms with their multiply-adds for the `N` tokens of `x`:

        - "weight": compose `W0 + scale B K V^T` (`out n^2`), one matmul (`N out n`); training adds the
          composition's backward and the weight gradient;
        - "activations": the frozen layer plus `B (K (V^T x))`: `N (2 out n + n^2)`, twice when training;
        - "full": `B ((I + scale K) V^T x)` alone, `N (out n + n^2)`, twice when training; only where
          `B V^T` rebuilds W0 to float32 rounding.
        K is sparse: its share is small in every form.
        """
        base, adapter = self.base, self.adapter
        n, out = adapter.n, adapter.out
        tokens = x.numel() // n
        passes = 2 if training else 1
        forms = {"weight": Form(self._composed_update, passes * out * n * n + tokens * out * n * (3 if training else 1))}
        if isinstance(base, nn.Conv2d) and (base.kernel_size != (1, 1) or base.stride != (1, 1) or base.groups != 1):
            return forms  # only 1x1 convs are matrices over the channels
        forms["activations"] = Form(lambda x: self._through_basis(x, full=False), passes * tokens * (2 * out * n + n * n))
        if adapter.rebuilds_w0:
            forms["full"] = Form(lambda x: self._through_basis(x, full=True), passes * tokens * (out * n + n * n))
        return forms

    def _through_basis(self, x: torch.Tensor, full: bool) -> torch.Tensor:
        """`B ((I + scale K) V^T x)` (full: W0 = B V^T) or the frozen layer plus `scale B K V^T x`."""
        base, adapter = self.base, self.adapter
        conv = isinstance(base, nn.Conv2d)
        rows = x.movedim(1, -1) if conv else x  # channels last: (..., n)
        dtype = compute_dtype(x)
        h = adapter.basis.vt.to(dtype) @ rows.reshape(-1, adapter.n).T.to(dtype)  # V^T x: (n, N)
        b = adapter.b.to(dtype)  # no copy where the weights are stored in the compute dtype
        if full:
            y = nn.functional.linear(adapter.apply_k(h, adapter.scale, plus_identity=True).T, b)  # (N, out)
            return self._add_bias(self._channels_first(y.view(rows.shape[:-1] + (-1,)), conv))
        update = nn.functional.linear(adapter.apply_k(h, adapter.scale).T, b)  # scale B K V^T x: (N, out)
        return self._run(x, base.weight) + self._channels_first(update.view(rows.shape[:-1] + (-1,)), conv)

    @staticmethod
    def _channels_first(y: torch.Tensor, conv: bool) -> torch.Tensor:
        return y.movedim(-1, 1) if conv else y


def decomposition_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # MPS has no float64


def group_decomposition(layers: list[nn.Module], pi: float, vt: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One group's `vt (n, n)` (float32; given from a file, or the joint basis) and per layer i
    `b.i = W_i P (out, n)`, `inv_sigma.i (n,)`, `rebuilds_w0.i` (a bool tensor), from the cache when there.
    A basis from a file is served by the cached entry when it is the same bit for bit."""

    def compute(given: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        weights = [weight_2d(layer) for layer in layers]  # (out, n) each
        work = decomposition_device(weights[0].device)
        basis_t = joint_basis([w.to(work) for w in weights], pi).float() if given is None else given.to(work).float()  # (n, n)
        p = inverse_transpose(basis_t)  # (n, n)
        p_norms = torch.linalg.vector_norm(p, dim=0)  # (n,)
        parts = {"vt": basis_t}
        for i, w in enumerate(weights):
            w32 = w.to(work).float()
            b = w32 @ p  # B_i = W_i P: (out, n)
            parts[f"b.{i}"] = b
            parts[f"inv_sigma.{i}"] = inverse_scales(b, w.to(work), p_norms)
            rebuilt = b.to(w.dtype).float() @ basis_t  # B_i V^T as the layer will hold B_i (in W_i's dtype)
            parts[f"rebuilds_w0.{i}"] = (rebuilt - w32).norm() <= FULL_FORM_TOLERANCE * w32.norm()
        return parts

    weights = [layer.weight for layer in layers]
    if vt is None:
        return cached("frod", {"pi": pi, "basis": "joint"}, weights, compute)
    parts = find("frod", {"pi": pi, "basis": "joint"}, weights)
    if parts is not None and torch.equal(parts["vt"].cpu(), vt.float().cpu()):
        return parts
    return cached("frod", {"pi": pi, "basis": weights_digest([vt.float()])}, weights, lambda: compute(vt))


@register
class FRoD(Method):
    declaration = FROD
    layer_cls = FRoDLayer
    slot_cls = FRoDSlot
    group_lr_ratio = {ON_AXIS: 1.0, OFF_AXIS: 0.1}  # lr(S) = lr(dsigma) / 10 (frod.txt Appendix E, Table 8)

    @classmethod
    def validate(cls, config: FRoDConfig) -> None:
        if not (is_number(config.density) and 0.0 <= config.density <= MAX_DENSITY):
            raise UserError(
                f"frod density must be a number between 0 and {MAX_DENSITY} (the fraction of S entries trained), got {config.density!r}"
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
            if shared is None:
                parts = group_decomposition([layers[name] for name in names], config.pi, None)
            else:
                vt = shared.get(f"{group}.vt")
                if vt is None or tuple(vt.shape) != (n, n):
                    raise UserError(
                        f"adapter file has no FRoD basis of shape ({n}, {n}) for layer group '{group}'; was it saved for another model?"
                    )
                parts = group_decomposition([layers[name] for name in names], config.pi, vt)
            basis = FRoDBasis(parts["vt"].to(device))
            count = num_off_axis(n, config.density)
            log.debug("frod group %s: %d layer(s), n=%d", group, len(names), n)
            for i, name in enumerate(names):
                if shared is None:
                    s_index = sample_off_diagonal(n, count, layer_generator(config.seed, name))
                else:
                    s_index = check_index(saved.get(name, {}).get("s_index"), n, count, name)
                b, inv_sigma, rebuilds_w0 = parts[f"b.{i}"], parts[f"inv_sigma.{i}"], bool(parts[f"rebuilds_w0.{i}"])
                adapters[name] = FRoDLayer(group, basis, layers[name].weight, b, inv_sigma, rebuilds_w0, s_index)
        return adapters

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
    if count > 1 and not bool((index[1:] > index[:-1]).all()):
        raise UserError(f"adapter file's FRoD index pattern for layer '{name}' is not sorted and distinct")
    if count and (index.min() < 0 or index.max() >= n * n or bool((index // n == index % n).any())):
        raise UserError(f"adapter file's FRoD index pattern for layer '{name}' is not off-diagonal in ({n}, {n})")
    return index
