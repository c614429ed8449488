"""peft baselines users know from kohya / LyCORIS / OneTrainer: DoRA, LoHa, LoKr and OFT.

Each is peft's own layer (`peft_slot.PeftSlot`) with peft's defaults (peft 0.21.2; each default in
declarations/peft_methods.py cites the field of `peft/tuners/<method>/config.py` it comes from). Per target
layer `W0 (out, in)` (`fan_in = in*k*k` for a conv; the default targets are the attention linears):

- dora: `W = m * (W0 + B A * alpha/r) / ||W0 + B A * alpha/r||` (row norms; Liu et al. 2024).
  Trainable: `r * (fan_in + out) + out` (A, B and the magnitude m).
- loha: `delta = (W1a W1b) * (W2a W2b) * alpha/r` (Hadamard product of two rank-r products;
  FedPara). Trainable: `2 * r * (fan_in + out)`.
- lokr: `delta = W1 kron W2 * alpha/r` with `out = a*b`, `in = c*d` split by peft's
  `factorization(dim, decompose_factor)`; `W2 (b, d*k*k)` is full when `r >= max(b, d)/2`, else
  `W2a (b, r) W2b (r, d*k*k)`; `W1 (a, c)` is full unless `decompose_both` and `r < max(a, c)/2`,
  then `W1a (a, r) W1b (r, c)`. Trainable: the sum of those shapes.
- oft: `W = W0 R^T` with `R = diag(R_1 .. R_{in/b})` block-diagonal, each `b x b` block the
  Cayley(-Neumann) transform of a skew-symmetric matrix with `b(b-1)/2` free entries.
  Trainable: `(in / b) * b(b-1)/2`, where peft replaces a `b` that does not divide `in` by the
  nearest divisor of `in` (`oft_block_size`; the tiny sd2 UNet's 48-wide cross-attention inputs
  get b = 24). Linear layers only (peft's OFT for convs rotates unfolded patches, another update).

DoRA and OFT are not additive in peft; their strength is the interpolation `W0 + s*(W_peft - W0)`
(see `peft_slot`). BOFT is not offered: peft builds each BOFT layer by trying to JIT-compile its
CUDA extension (fbd_cuda, `torch.utils.cpp_extension.load`); where that fails, as on a CPU-only
machine, it warns and retries at every layer, so attaching does a compiler run per target.
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .base import register
from .declarations.peft_methods import DORA, LOHA, LOKR, DoRAConfig, LoHaConfig, LoKrConfig, OFTConfig
from .declarations.peft_methods import OFT as OFT_DECLARATION
from .peft_slot import PeftMethod


def _fan_in(layer: nn.Module) -> int:
    return layer.weight[0].numel()  # in (Linear) or in*k*k (Conv2d)


def _check_rank_alpha(method: str, rank: int, alpha: float) -> None:
    if rank < 1:
        raise UserError(f"{method} rank must be a positive integer, got {rank}")
    if alpha <= 0:
        raise UserError(f"{method} alpha must be a positive number, got {alpha}")


@register
class DoRA(PeftMethod):
    declaration = DORA
    additive = False

    @classmethod
    def validate(cls, config: DoRAConfig) -> None:
        _check_rank_alpha(cls.name, config.rank, config.alpha)

    @classmethod
    def peft_config(cls, config: DoRAConfig, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, use_dora=True)

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: DoRAConfig) -> int:
        out = layer.weight.shape[0]
        return config.rank * (_fan_in(layer) + out) + out


@register
class LoHa(PeftMethod):
    declaration = LOHA

    @classmethod
    def validate(cls, config: LoHaConfig) -> None:
        _check_rank_alpha(cls.name, config.rank, config.alpha)

    @classmethod
    def peft_config(cls, config: LoHaConfig, targets: list[str]):
        from peft import LoHaConfig as PeftLoHaConfig

        return PeftLoHaConfig(r=config.rank, alpha=config.alpha, target_modules=targets)

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: LoHaConfig) -> int:
        return 2 * config.rank * (_fan_in(layer) + layer.weight.shape[0])


@register
class LoKr(PeftMethod):
    declaration = LOKR

    @classmethod
    def validate(cls, config: LoKrConfig) -> None:
        _check_rank_alpha(cls.name, config.rank, config.alpha)
        if config.decompose_factor != -1 and config.decompose_factor < 1:
            raise UserError(f"lokr decompose_factor must be -1 (near the square root) or a positive integer, got {config.decompose_factor}")

    @classmethod
    def peft_config(cls, config: LoKrConfig, targets: list[str]):
        from peft import LoKrConfig as PeftLoKrConfig

        return PeftLoKrConfig(
            r=config.rank,
            alpha=config.alpha,
            decompose_factor=config.decompose_factor,
            decompose_both=config.decompose_both,
            target_modules=targets,
        )

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: LoKrConfig) -> int:
        from peft.tuners.lokr.layer import factorization

        weight, r = layer.weight, config.rank
        taps = weight[0, 0].numel()  # k*k for a conv, 1 for a linear
        a, b = factorization(weight.shape[0], config.decompose_factor)  # out = a * b
        c, d = factorization(weight.shape[1], config.decompose_factor)  # in = c * d
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = r >= max(b, d) / 2
        w1 = a * c if full_w1 else r * (a + c)
        w2 = b * d * taps if full_w2 else r * (b + d * taps)
        return w1 + w2


@register
class OFT(PeftMethod):
    declaration = OFT_DECLARATION
    layer_types = (nn.Linear,)
    additive = False

    @classmethod
    def validate(cls, config: OFTConfig) -> None:
        if config.block_size < 2:
            raise UserError(f"oft block_size must be an integer >= 2 (a 1x1 block cannot rotate), got {config.block_size}")

    @classmethod
    def peft_config(cls, config: OFTConfig, targets: list[str]):
        from peft import OFTConfig as PeftOFTConfig

        return PeftOFTConfig(
            r=0,
            oft_block_size=config.block_size,
            use_cayley_neumann=config.use_cayley_neumann,
            target_modules=targets,
        )

    @classmethod
    def count_trainable(cls, layer: nn.Module, config: OFTConfig) -> int:
        width = _fan_in(layer)
        b = oft_block_size(width, config.block_size)
        return width // b * (b * (b - 1) // 2)


def oft_block_size(width: int, block: int) -> int:
    """The block size peft's OFT uses on a layer of input width `width`: `block` where it divides
    `width`, else the nearest divisor of `width` (the smaller one on a tie; `width` itself when
    `block > width`), as `OFTLayer.adjust_oft_parameters` (peft warns when it adjusts)."""
    if block >= width:
        return width
    if width % block == 0:
        return block
    higher = block
    while higher <= width and width % higher:
        higher += 1
    lower = block
    while lower > 1 and width % lower:
        lower -= 1
    return lower if block - lower <= higher - block else higher
