"""Filter atoms (filter-atoms.txt §3.1, §3.2, §3.4): tune only the spatial atoms of each k x k conv.

A conv weight `W0 (out, in, k, k)` flattened to `W_flat (out*in, k*k)` is written as atom
coefficients times atoms, `W_flat = alpha @ D`. The decomposition is a truncated SVD
`W_flat = U S V^T`, `alpha = U_m S_m`, `D = V_m^T (m, k*k)` (ADAPTERS.md §1: deterministic,
instead of the paper's randomly initialised sparse coding). Tuning `D -> D + dD` gives

    delta_flat = alpha @ dD = W_flat @ (V_m @ dD)          # (out*in, k*k)

so `alpha` is never stored: the layer keeps `V_m (k*k, m)` and reads W0 from the layer itself.
With `m = k*k` the atoms are complete and the update is basis-free, `W_flat @ M` with
`M = V @ dD (k*k, k*k)` any matrix.

Variants, each in delta form (`delta(theta_init) == 0` exactly, no residual is stored):
- overcomplete (`m1 >= 1`, §3.2, configuration C3): atom `l` of input channel `i` is a mix of
  `m1` sub-atoms, `D^(i)[l] = sum_j beta[i, l, j] D1[l*m1 + j]`, with `D1 (m*m1, k*k)` initialised
  by repeating each atom `m1` times and `beta (in, m, m1)` initialised to `1/m1`. Both are
  trained as offsets from that init, so `delta = W(theta) - W(theta_init)` is exactly zero at init;
  `alpha @ E_i` for every input channel is again computed as `W_flat[:, i] @ (V_m @ E_i)`, so
  the W0-sized `alpha` buffer of the paper's formulation is not needed either.
- `tune_coefficients` (the paper's C4): `alpha` trainable too, as an offset `dalpha (out*in, m)`;
  the update gains `dalpha @ D(theta)`. The paper shows it overfits (Table 2, diversity 3.17):
  an explicit option only.

Running the layer (`own_forms`): the adapted filter is `w (I + M)` with `M = V_m @ dD (k*k, k*k)`,
so the conv is `W0 (out, in*k*k) @ ((I + M) @ patches(x))`: every input channel's `k*k`
neighbourhood values (im2col, `F.unfold`, or a grouped conv) are mixed by `I + M` (per input
channel `M_i` when overcomplete), then W0 multiplies them as one matrix. This is the paper's
two-stage convolution: no composed weight, no weight gradient, `k^4` extra multiply-adds per input
value. The slot weighs it against composing `W0 + delta` for one `F.conv2d` (`forms.py`: measured,
or by multiply-adds); with tuned coefficients it always composes. Measured earlier with a fixed rule
(two-stage where a conv has at most as many output positions as filters, on every conv of SD 1.5 at
256 px, forward + backward, two CPU threads): 250 ms against 326 ms for the frozen convs alone.

The basis `V_m` is stored in the adapter file: SVD vectors are defined only up to sign (and up to
rotation for tied singular values), and a sign rule on a 9-entry vector is fragile for
antisymmetric (gradient-like) atoms, so recomputing it on another device could silently change
what a saved `dD` means. It costs `k*k*m` floats per conv, as much as `dD`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .base import LayerAdapter, Method, register
from .declarations.filter_atoms import FILTER_ATOMS, FilterAtomsConfig
from .forms import Form
from .slots import compute_dtype

# Which variant of the two-stage form the multiply-add model offers (`forms.py`; measuring times
# both): im2col (`unfold`) + matmul up to this many output positions per image, else a grouped conv +
# 1x1 conv. Measured per layer, forward + backward (SD 1.5 convs, CPU): at 8x8 and 4x4 unfold is 2-5x
# faster with two threads; at 16x16 the convs are (640x640: 19.0 against 20.8 ms, 640x1280: 37 against 46 ms).
UNFOLD_MAX_POSITIONS = 128


def is_spatial_conv(module: nn.Module) -> bool:
    """A Conv2d whose kernel has more than one tap (1x1 convs are linear layers for this method)."""
    return isinstance(module, nn.Conv2d) and module.kernel_size[0] * module.kernel_size[1] > 1


def decomposition_device(tensor: torch.Tensor) -> torch.device:
    """The weight's device, except MPS (no float64 there): decompose on the CPU instead."""
    return torch.device("cpu") if tensor.device.type == "mps" else tensor.device


def right_singular_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Right singular vectors of `matrix (rows, cols)` as the columns of a (cols, cols) float32
    matrix, by decreasing singular value, on the matrix's device.

    Computed as the eigenvectors of the Gram matrix `matrix^T matrix` (float32 product, float64
    eigh): here rows >> cols (out*in rows, k*k columns), so this is one thin matmul over the weight
    as it is (no float64 copy of W0) instead of an SVD of the tall matrix, and gives the same
    vectors up to sign, which the layers make irrelevant by saving the basis.
    """
    work = matrix.detach().to(decomposition_device(matrix), torch.float32)  # no copy for float32 weights
    gram = (work.T @ work).double()  # (cols, cols)
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors.flip(-1).to(device=matrix.device, dtype=torch.float32).contiguous()


def require_int(method: str, **values: object) -> None:
    """UserError unless every value is an integer (not a bool)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{method} {name} must be an integer, got {value!r}")


def check_saved_basis(saved: dict[str, torch.Tensor], shape: tuple[int, int], name: str) -> None:
    """Reject a basis from an adapter file whose shape does not fit layer `name` and the config."""
    basis = saved.get("basis")
    if basis is not None and tuple(basis.shape) != shape:
        raise UserError(
            f"adapter file stores a basis of shape {tuple(basis.shape)} for layer '{name}', "
            f"its config needs {shape}; the file is damaged or was edited"
        )


class FilterAtomsLayer(LayerAdapter):
    """Atom updates of one k x k conv: `delta_atoms (m, k*k)`, or the overcomplete offsets
    `delta_sub_atoms (m*m1, k*k)` and `delta_beta (in, m, m1)`; plus `delta_alpha (out*in, m)` when
    coefficients are tuned. All zeros at init."""

    saved_buffers = ("basis",)

    def __init__(self, layer: nn.Module, config: FilterAtomsConfig, saved: dict[str, torch.Tensor]) -> None:
        super().__init__()
        weight = layer.weight  # (out, in, kh, kw)
        out, cin = weight.shape[:2]
        taps = weight[0, 0].numel()  # k*k
        m, m1 = config.m, config.m1
        basis = saved.get("basis")
        if basis is None:
            basis = right_singular_basis(weight.detach().reshape(out * cin, taps))[:, :m]
        self.register_buffer("basis", basis.to(weight.device, torch.float32).contiguous(), persistent=False)  # (k*k, m)
        # W0 itself, not a copy: a plain tuple so it is neither a submodule, a buffer nor saved twice.
        # It stays W0 while the adapter is merged (merge swaps in a new Parameter on the layer).
        self._base_weight = (weight,)
        self.m1 = m1
        device = weight.device
        if m1 == 0:
            self.delta_atoms = nn.Parameter(torch.zeros(m, taps, device=device))  # (m, k*k)
        else:
            self.delta_sub_atoms = nn.Parameter(torch.zeros(m * m1, taps, device=device))  # (m*m1, k*k)
            self.delta_beta = nn.Parameter(torch.zeros(cin, m, m1, device=device))  # (in, m, m1)
        if config.tune_coefficients:
            self.delta_alpha = nn.Parameter(torch.zeros(out * cin, m, device=device))  # (out*in, m)
        self.tune_coefficients = config.tune_coefficients

    def atom_change(self) -> torch.Tensor:
        """`D(theta) - D(theta_init)`: (m, k*k), or (in, m, k*k) per input channel when overcomplete."""
        if self.m1 == 0:
            return self.delta_atoms
        atoms = self.basis.T  # (m, k*k) = D, the initial atoms
        m, taps = atoms.shape
        d_sub = self.delta_sub_atoms.view(m, self.m1, taps)  # (m, m1, k*k)
        sub_atoms = atoms[:, None, :] + d_sub  # (m, m1, k*k) = D1: each atom repeated m1 times, plus offsets
        # beta = 1/m1 + delta_beta: sum_j beta[i,l,j] D1[l,j] - D[l] = mean_j dD1[l,j] + sum_j delta_beta[i,l,j] D1[l,j]
        mixed = torch.einsum("ilj,ljk->ilk", self.delta_beta, sub_atoms)  # (in, m, k*k)
        return d_sub.mean(dim=1) + mixed

    def tap_mixing(self) -> torch.Tensor:
        """`I + scale * M`: (k*k, k*k), or (in, k*k, k*k) per input channel when overcomplete."""
        change = self.atom_change()  # (m, k*k) or (in, m, k*k)
        eye = torch.eye(self.basis.shape[0], device=change.device)
        return eye + self.scale * (self.basis @ change)

    def compose_cost(self) -> int:
        return self._base_weight[0].numel() * self.basis.shape[0]  # W_flat (out*in, k*k) @ (I + M) (k*k, k*k)

    def own_forms(self, layer: nn.Module, x: torch.Tensor, training: bool) -> dict[str, Form]:
        """The two-stage convolution, as im2col + matmul ("taps_unfold") or as a grouped conv + 1x1
        conv ("taps_conv"): the same multiply-adds, `positions x in x k^4` for the tap mixing plus the
        frozen conv, no weight gradient. The model offers the variant UNFOLD_MAX_POSITIONS picks."""
        if self.tune_coefficients or layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return {}  # tuned coefficients (dalpha is W0-sized) or an unusual conv: compose the weight
        out, cin, kh, kw = self._base_weight[0].shape
        batch, _, height, width = x.shape
        rows, cols = (
            (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for size, pad, dil, k, stride in zip((height, width), layer.padding, layer.dilation, (kh, kw), layer.stride)
        )
        positions, taps = batch * rows * cols, kh * kw
        mixing, conv = positions * cin * taps * taps, positions * out * cin * taps
        cost = 3 * mixing + 2 * conv if training else mixing + conv  # forward, input gradient, mixing's gradient
        unfold = rows * cols <= UNFOLD_MAX_POSITIONS
        return {
            "taps_unfold": Form(lambda x: self.two_stage(layer, x, rows, cols, unfold=True), cost if unfold else None),
            "taps_conv": Form(lambda x: self.two_stage(layer, x, rows, cols, unfold=False), None if unfold else cost),
        }

    def two_stage(self, layer: nn.Module, x: torch.Tensor, rows: int, cols: int, unfold: bool) -> torch.Tensor:
        """`W0 @ ((I + scale M) @ patches(x))`: each input's kernel taps mixed, then the frozen filters."""
        w0 = self._base_weight[0].detach()  # (out, in, kh, kw)
        out, cin, kh, kw = w0.shape
        batch = x.shape[0]
        dtype = compute_dtype(x)
        x, mix, taps = x.to(dtype), self.tap_mixing().to(dtype), kh * kw
        if not unfold:  # mixed copies by a grouped conv, then W0 as a 1x1 conv
            kernel = mix.expand(cin, taps, taps).reshape(cin * taps, 1, kh, kw)  # row i*k*k + t: copy t of channel i
            copies = nn.functional.conv2d(x, kernel, None, layer.stride, layer.padding, layer.dilation, cin)  # (B, in*k*k, H', W')
            return nn.functional.conv2d(copies, w0.view(out, -1, 1, 1).to(dtype), layer.bias)
        patches = nn.functional.unfold(x, (kh, kw), layer.dilation, layer.padding, layer.stride)  # (B, in*k*k, L)
        mixed = mix @ patches.view(batch, cin, taps, -1)  # (B, in, k*k, L)
        y = w0.view(out, -1).to(dtype) @ mixed.view(batch, cin * taps, -1)  # (B, out, L)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)[:, None]
        return y.view(batch, out, rows, cols)

    def delta_weight(self) -> torch.Tensor:
        w0 = self._base_weight[0].detach()
        shape = w0.shape
        out, cin = shape[:2]
        w = w0.reshape(out, cin, -1)  # (out, in, k*k), in W0's dtype: no float32 copy of W0 per step
        change = self.atom_change()
        if change.dim() == 2:
            mix = self.basis @ change  # (k*k, k*k)
            delta = (w.reshape(out * cin, -1) @ mix.to(w.dtype)).float()  # (out*in, k*k)
        else:
            # basis @ change[i] for every i, folded into one (in*k*k, m) @ (m, k*k) matmul (a broadcast
            # batched matmul can fall back to a loop over the input channels).
            mix = (change.transpose(1, 2) @ self.basis.T).transpose(1, 2)  # (in, k*k, k*k)
            per_channel = torch.bmm(w.transpose(0, 1), mix.to(w.dtype))  # (in, out, k*k)
            delta = per_channel.transpose(0, 1).float().reshape(out * cin, -1)  # (out*in, k*k)
        if self.tune_coefficients:
            atoms = self.basis.T + change  # D(theta): (m, k*k) or (in, m, k*k)
            if atoms.dim() == 2:
                delta = delta + self.delta_alpha @ atoms
            else:
                coeff = self.delta_alpha.view(out, cin, -1)  # (out, in, m)
                delta = delta + torch.einsum("oil,ilk->oik", coeff, atoms).reshape(out * cin, -1)
        return delta.reshape(shape)


@register
class FilterAtoms(Method):
    declaration = FILTER_ATOMS
    layer_cls = FilterAtomsLayer
    layer_types = (nn.Conv2d,)

    @classmethod
    def validate(cls, config: FilterAtomsConfig) -> None:
        require_int("filter_atoms", m=config.m, m1=config.m1)
        if not isinstance(config.tune_coefficients, bool):
            raise UserError(f"filter_atoms tune_coefficients must be true or false, got {config.tune_coefficients!r}")
        if config.m < 1:
            raise UserError(f"filter_atoms m (atoms per conv) must be between 1 and k*k (9 for 3x3), got {config.m}")
        if config.m1 < 0:
            raise UserError(f"filter_atoms m1 must be 0 (plain atoms) or a positive number of sub-atoms, got {config.m1}")

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return is_spatial_conv(module)

    @classmethod
    def build_layers(cls, layers, config, saved=None):
        saved = saved or {}
        adapters = {}
        for name, layer in layers.items():
            taps = layer.weight[0, 0].numel()
            if config.m > taps:
                raise UserError(
                    f"filter_atoms m={config.m} is more atoms than layer '{name}' has kernel taps "
                    f"({'x'.join(map(str, layer.weight.shape[2:]))} = {taps}); accepted: 1..{taps}"
                )
            layer_saved = saved.get(name, {})
            check_saved_basis(layer_saved, (taps, config.m), name)
            adapters[name] = cls.layer_cls(layer, config, layer_saved)
        return adapters

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: FilterAtomsConfig) -> int:
        out, cin = layer.weight.shape[:2]
        taps = layer.weight[0, 0].numel()
        m, m1 = config.m, config.m1
        count = m * taps if m1 == 0 else m * m1 * taps + cin * m * m1
        if config.tune_coefficients:
            count += out * cin * m
        return count
