"""peft baselines users know from kohya / LyCORIS / OneTrainer: DoRA, LoHa, LoKr and OFT.

Each is peft's own layer (`peft_slot.PeftSlot`) with peft's defaults (peft 0.21.2; each default
cites the config field it comes from, in `peft/tuners/<method>/config.py`). Per target layer
`W0 (out, in)` (`fan_in = in*k*k` for a conv; the default targets are the attention linears):

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

from dataclasses import dataclass

from torch import nn

from ..errors import UserError
from .base import AdapterConfig, TrainDefaults, register
from .peft_slot import PeftMethod


def _fan_in(layer: nn.Module) -> int:
    return layer.weight[0].numel()  # in (Linear) or in*k*k (Conv2d)


def _check_rank_alpha(method: str, rank: int, alpha: float) -> None:
    if rank < 1:
        raise UserError(f"{method} rank must be a positive integer, got {rank}")
    if alpha <= 0:
        raise UserError(f"{method} alpha must be a positive number, got {alpha}")


@dataclass
class DoRAConfig(AdapterConfig):
    rank: int = 8  # LoraConfig.r default (peft tuners/lora/config.py)
    alpha: float = 8.0  # LoraConfig.lora_alpha default: alpha = r, update scale 1


@register
class DoRA(PeftMethod):
    name = "dora"
    description = "DoRA (peft): LoRA direction + trained per-row magnitude of each attention projection"
    config_cls = DoRAConfig
    additive = False
    train_defaults = TrainDefaults(lr=1e-4, steps=500, source="as the LoRA baseline (DoRA paper: DoRA uses LoRA's settings)")

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


@dataclass
class LoHaConfig(AdapterConfig):
    rank: int = 8  # LoHaConfig.r default (peft tuners/loha/config.py)
    alpha: float = 8.0  # LoHaConfig.alpha default: alpha = r, update scale 1


@register
class LoHa(PeftMethod):
    name = "loha"
    description = "LoHa (peft): Hadamard product of two low-rank updates on each attention projection"
    config_cls = LoHaConfig
    train_defaults = TrainDefaults(lr=1e-4, steps=500, source="as the LoRA baseline (peft gives no LoHa training defaults)")

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


@dataclass
class LoKrConfig(AdapterConfig):
    rank: int = 8  # LoKrConfig.r default (peft tuners/lokr/config.py)
    alpha: float = 8.0  # LoKrConfig.alpha default: alpha = r, update scale 1
    decompose_factor: int = -1  # LoKrConfig.decompose_factor default: split each width near its square root
    decompose_both: bool = False  # LoKrConfig.decompose_both default: the left Kronecker factor is a full matrix


@register
class LoKr(PeftMethod):
    name = "lokr"
    description = "LoKr (peft): Kronecker product of a small and a low-rank matrix on each attention projection"
    config_cls = LoKrConfig
    train_defaults = TrainDefaults(lr=1e-4, steps=500, source="as the LoRA baseline (peft gives no LoKr training defaults)")

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


@dataclass
class OFTConfig(AdapterConfig):
    block_size: int = 32  # OFTConfig.oft_block_size default (peft tuners/oft/config.py; r = 0 derives the block count)
    use_cayley_neumann: bool = True  # OFTConfig.use_cayley_neumann field default (5 Neumann terms instead of an inverse)


@register
class OFT(PeftMethod):
    name = "oft"
    description = "OFT (peft): block-diagonal orthogonal rotation of each attention projection's input"
    config_cls = OFTConfig
    layer_types = (nn.Linear,)
    additive = False
    train_defaults = TrainDefaults(lr=1e-4, steps=500, source="as the LoRA baseline (peft gives no OFT training defaults)")

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
