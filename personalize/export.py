"""Export any adapter as a standard LoRA file that diffusers, A1111 and ComfyUI load.

Every method here is a weight update `scale * delta` per layer (`Adapter.deltas()`), so a truncated
SVD of each update (`personalize.lowrank`) is a LoRA. A linear update `(out, in)` becomes
`down (r, in)`, `up (out, r)`; a conv update `(out, in, k, k)` becomes LoCon factors,
`down (r, in, k, k)` (a k x k conv to r channels, with the layer's stride and padding) and
`up (out, r, 1, 1)`, exact for any kernel size, 1x1 included.

Formats:
- `diffusers`: PEFT keys `unet.<module>.lora_A.weight` / `.lora_B.weight` for
  `pipe.load_lora_weights(file)`. The per-layer ranks, with alpha = rank (scale 1), are stored as a
  PEFT LoraConfig in the `lora_adapter_metadata` header, which diffusers reads instead of guessing.
- `kohya`: `lora_unet_<module, dots as _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, the
  layout kohya's sd-scripts writes for SD 1.x/2.x, read by A1111, ComfyUI and diffusers. Every
  layer has alpha 1 (sd-scripts' default), so a loader applies `up @ down / rank`; each factor
  carries `sqrt(rank)` to compensate. One alpha for all layers matters: diffusers files per-layer
  alphas of attention layers under names PEFT does not match, and would scale those layers wrongly.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_path
from .errors import UserError
from .inject import Adapter, base_model_id, load_adapter
from .lowrank import factorize, validate_rank_energy

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "kohya")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_FORMAT = "kohya"  # the one layout A1111, ComfyUI and diffusers all load
DEFAULT_DTYPE = "float16"  # what LoRA files ship as; float32 only to check exactness
DEFAULT_ENERGY = 0.99  # keep 99% of each update's squared norm: relative error <= 10% per layer
KOHYA_ALPHA = 1.0  # sd-scripts' default --network_alpha; the factors absorb sqrt(rank) each
DIFFUSERS_PREFIX = "unet"  # the pipeline component diffusers routes `unet.*` keys to
KOHYA_PREFIX = "lora_unet_"
# Layers whose kohya name must use the LDM spelling, as sd-scripts writes it for SDXL: diffusers'
# kohya converter reads `lora_unet_add_embedding_linear_1` as `add_embedding.linear` (it strips a
# layer index from names containing "emb"), and A1111 finds SDXL's label embedding only by its
# LDM name. ComfyUI accepts both spellings.
KOHYA_LDM_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

ProgressCallback = Callable[[int, int, str], None]  # (layers done, layers in total, layer name)


@dataclass
class LayerExport:
    """One exported layer: its LoRA rank and how far the stored factors are from the update."""

    name: str
    kind: str  # "linear" or "conv<k>x<k>"
    shape: tuple[int, ...]  # the layer's weight shape
    rank: int
    full_rank: int  # min(out, in*k*k)
    error: float  # ||delta - exported||_F / ||delta||_F, with the factors as stored (dtype included)
    norm: float  # ||delta||_F
    num_params: int  # numbers stored for this layer


@dataclass
class ExportReport:
    """What `export_lora` wrote: per-layer ranks and errors, skipped layers and the file size."""

    output: Path
    format: str
    dtype: str
    method: str
    base_model: str
    layers: list[LayerExport]
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it is not in the file
    lost_norm2: float = 0.0  # squared norm of updates that could not be exported
    file_size: int = 0

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers)

    @property
    def error(self) -> float:
        """Relative Frobenius error over all target layers together (unexported updates count in full)."""
        total = sum(layer.norm**2 for layer in self.layers) + self.lost_norm2
        missing = sum((layer.error * layer.norm) ** 2 for layer in self.layers) + self.lost_norm2
        return math.sqrt(missing / total) if total > 0 else 0.0

    def table(self) -> str:
        """Per-layer ranks and errors, then the totals, as plain text."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':{width}s}  {'kind':8s} {'weight shape':18s} {'rank':>11s}  rel. error"]
        for layer in self.layers:
            shape = "x".join(str(d) for d in layer.shape)
            lines.append(f"{layer.name:{width}s}  {layer.kind:8s} {shape:18s} {layer.rank:5d}/{layer.full_rank:<5d}  {layer.error:.2e}")
        for name, reason in self.skipped.items():
            lines.append(f"not exported: {name} ({reason})")
        lines.append(
            f"{len(self.layers)} layers, {self.num_params:,} parameters, overall relative error {self.error:.2e}, "
            f"{format_size(self.file_size)} ({self.format}, {self.dtype}) -> {self.output}"
        )
        return "\n".join(lines)


def format_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value, unit = size / 1024, "KB"
    for bigger in ("MB", "GB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def check_options(
    format: str,
    output: str | Path,
    rank: int | None,
    energy: float | None,
    dtype: str | torch.dtype,
    source: str | Path | None = None,
) -> str:
    """Validate the export options where they enter (`source`: the adapter file); returns the dtype's name."""
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}'; accepted: {', '.join(FORMATS)}")
    validate_rank_energy(rank, energy)
    if Path(output).suffix != ".safetensors":
        raise UserError(f"output '{output}' must be a .safetensors file (what diffusers, A1111 and ComfyUI load)")
    if source is not None and Path(output).resolve() == Path(source).resolve():
        raise UserError(f"output '{output}' is the adapter file itself; choose another output path")
    if isinstance(dtype, torch.dtype):
        names = {value: key for key, value in DTYPES.items()}
        if dtype not in names:
            raise UserError(f"unsupported export dtype {dtype}; accepted: {', '.join(DTYPES)}")
        return names[dtype]
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype '{dtype}'; accepted: {', '.join(DTYPES)}")
    return dtype


def export_lora(
    unet: nn.Module,
    adapter_path: str | Path,
    format: str = DEFAULT_FORMAT,
    *,
    output: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | torch.dtype = DEFAULT_DTYPE,
    on_layer: ProgressCallback | None = None,
) -> ExportReport:
    """Write the adapter file `adapter_path`, applied to `unet` (its base model), as a LoRA file.

    Each layer keeps the fewest singular triplets that hold `energy` of its update's squared
    Frobenius norm, and at most `rank` of them; with neither given, energy 0.99. `unet` is left as it was.
    """
    check_options(format, output, rank, energy, dtype, source=adapter_path)
    adapter = load_adapter(unet, adapter_path)
    try:
        return export_adapter(adapter, format, output=output, rank=rank, energy=energy, dtype=dtype, on_layer=on_layer)
    finally:
        adapter.detach()


@torch.no_grad()
def export_adapter(
    adapter: Adapter,
    format: str = DEFAULT_FORMAT,
    *,
    output: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | torch.dtype = DEFAULT_DTYPE,
    on_layer: ProgressCallback | None = None,
) -> ExportReport:
    """Export an attached adapter (at its current `scale`) as a LoRA file; see `export_lora`."""
    dtype_name = check_options(format, output, rank, energy, dtype)
    if rank is None and energy is None:
        energy = DEFAULT_ENERGY
    tensors: dict[str, torch.Tensor] = {}
    report = ExportReport(
        output=Path(output), format=format, dtype=dtype_name, method=adapter.name, base_model=base_model_id(adapter.root), layers=[]
    )
    total = len(adapter.slots)
    for done, (name, slot) in enumerate(adapter.slots.items(), 1):
        module = slot.base
        delta = slot.delta()  # (out, in) or (out, in, k, k), float32
        if not bool(torch.isfinite(delta).all()):
            raise UserError(f"the update of layer '{name}' holds NaN or infinite values (a diverged training run?); nothing exported")
        reason = unsupported_reason(module)
        if reason is not None:
            report.skipped[name] = reason
            report.lost_norm2 += float(delta.double().norm()) ** 2
        else:
            layer = export_layer(name, delta, format, rank, energy, DTYPES[dtype_name], tensors)
            if layer is None:
                report.skipped[name] = "its update is zero"
            else:
                report.layers.append(layer)
        if on_layer is not None:
            on_layer(done, total, name)
    if not report.layers:
        raise UserError(
            f"nothing to export: the adapter's update is zero or unsupported on every layer "
            f"({', '.join(sorted(set(report.skipped.values())))})"
        )
    write(report, tensors)
    log.info(
        "exported %d layers to %s (%s), overall relative error %.2e",
        len(report.layers),
        report.output,
        format_size(report.file_size),
        report.error,
    )
    return report


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer's update has no LoRA form in either format, or None if it has one."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        return None if module.groups == 1 else f"grouped conv (groups={module.groups}) has no LoRA form"
    return f"{type(module).__name__} layers have no LoRA form (only Linear and Conv2d)"


def export_layer(
    name: str,
    delta: torch.Tensor,
    format: str,
    rank: int | None,
    energy: float | None,
    dtype: torch.dtype,
    tensors: dict[str, torch.Tensor],
) -> LayerExport | None:
    """Factor one update, add its tensors (in `dtype`, on the CPU) to `tensors`; None if it is zero."""
    matrix = delta.reshape(delta.shape[0], -1)  # (out, in*k*k)
    low = factorize(matrix, rank=rank, energy=energy)
    if low.rank == 0:
        return None
    # kohya loaders apply alpha/rank to up @ down: give each factor sqrt(rank/alpha) to undo it.
    factor_scale = math.sqrt(low.rank / KOHYA_ALPHA) if format == "kohya" else 1.0
    up = (low.up * factor_scale).to(dtype)  # (out, r)
    down = (low.down * factor_scale).to(dtype)  # (r, in*k*k)
    applied = up.double() @ down.double() / factor_scale**2  # what a loader adds to W0
    target = matrix.to(applied.device, torch.float64)
    norm = float(target.norm())
    error = float((applied - target).norm()) / norm
    if delta.dim() == 4:  # LoCon: k x k conv to r channels, then a 1x1 conv to out channels
        out_ch, in_ch, kh, kw = delta.shape
        down, up = down.reshape(low.rank, in_ch, kh, kw), up.reshape(out_ch, low.rank, 1, 1)
        kind = f"conv{kh}x{kw}"
    else:
        kind = "linear"
    if format == "diffusers":
        key = f"{DIFFUSERS_PREFIX}.{name}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down.cpu().contiguous(), up.cpu().contiguous()
    else:
        key = kohya_name(name)
        assert f"{key}.lora_down.weight" not in tensors, f"two layers map to the kohya name {key}"
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down.cpu().contiguous(), up.cpu().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(KOHYA_ALPHA, dtype=torch.float32)
    return LayerExport(
        name=name,
        kind=kind,
        shape=tuple(delta.shape),
        rank=low.rank,
        full_rank=low.full_rank,
        error=error,
        norm=norm,
        num_params=up.numel() + down.numel(),
    )


def kohya_name(name: str) -> str:
    """`lora_unet_` + the module path with dots as underscores (LDM spelling where it must be)."""
    return KOHYA_PREFIX + KOHYA_LDM_NAMES.get(name, name).replace(".", "_")


def write(report: ExportReport, tensors: dict[str, torch.Tensor]) -> None:
    """Write the tensors with the format's header atomically; sets `report.file_size`."""
    source = {"method": report.method, "base_model": report.base_model, "relative_error": f"{report.error:.3e}"}
    metadata = {"format": "pt", "personalize.export": json.dumps(source)}
    ranks = {layer.name: layer.rank for layer in report.layers}
    common = Counter(ranks.values()).most_common(1)[0][0]
    if report.format == "diffusers":
        pattern = {f"^{name}": r for name, r in ranks.items() if r != common}  # diffusers' own key style
        config = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": pattern, "target_modules": sorted(ranks)}
        metadata["lora_adapter_metadata"] = json.dumps({f"{DIFFUSERS_PREFIX}.{k}": v for k, v in config.items()}, sort_keys=True)
    else:
        metadata.update(
            ss_network_module="networks.lora",
            ss_network_dim=str(common) if len(set(ranks.values())) == 1 else "Dynamic",
            ss_network_alpha=str(KOHYA_ALPHA),
        )
    with atomic_path(report.output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    report.file_size = report.output.stat().st_size
