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
  A1111 and ComfyUI do not read these key names: they skip the file's layers.
- `kohya`: `lora_unet_<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`, named as kohya's
  sd-scripts names them, read by A1111, ComfyUI and diffusers. Every layer has alpha 1 (sd-scripts'
  default), so a loader applies `up @ down / rank`; each factor carries `sqrt(rank)` to compensate.
  One alpha for all layers matters: diffusers files per-layer alphas of attention layers under
  names PEFT does not match, and would scale those layers wrongly.

Kohya names (`kohya_names`), dots written as `_`:
- SD 1.x/2.x: the diffusers module path (`down_blocks_0_attentions_0_proj_in`); sd-scripts trains
  those models on the diffusers UNet.
- SDXL: the module path in the original LDM/SGM UNet (`model.diffusion_model`), which sd-scripts
  trains SDXL on: `input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `input_blocks_3_0_op`,
  `middle_block_1_proj_in`, `output_blocks_2_2_conv`, `time_embed_0`, `label_emb_0_0`, `out_2`.
  Every key of an SDXL file is spelled this way, never a mix: diffusers' converter drops the LDM keys
  of a mixed file, and A1111 misplaces diffusers-spelled SDXL upsamplers. The mapping is derived from
  the UNet config (`ldm_table`), so it holds for any UNet with SDXL's block types.
The kohya header also names the base as sd-scripts does (`ss_base_model_version`, `ss_v2`,
`ss_sd_model_name`): A1111 hides SDXL and SD 2.x LoRAs from its LoRA tab without it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

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
# `ss_base_model_version` as sd-scripts writes it (model_util.get_model_version_str_for_sd1_sd2,
# sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0). A1111 reads "sdxl_*" as SDXL and `ss_v2` "True" as SD 2.x.
KOHYA_BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
# SDXL layers outside the down/mid/up blocks: diffusers name -> LDM name.
LDM_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}
# The Linear/Conv2d layers of a diffusers ResnetBlock2D -> their names in an LDM ResBlock.
LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# The block types the LDM mapping knows -> whether the block has attentions (transformers).
LDM_BLOCK_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True, "UpBlock2D": False, "CrossAttnUpBlock2D": True}
LDM_MID_BLOCK = "UNetMidBlock2DCrossAttn"
DIFFUSERS_ONLY = (
    "diffusers format: loads with diffusers' pipe.load_lora_weights; A1111 and ComfyUI do not read it, use --format kohya for them"
)

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
    family: str | None = None  # "sd1", "sd2" or "sdxl" (`unet_family`); None for other models
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
        base = f", {KOHYA_BASE_VERSIONS[self.family]} base" if self.format == "kohya" and self.family else ""
        lines.append(
            f"{len(self.layers)} layers, {self.num_params:,} parameters, overall relative error {self.error:.2e}, "
            f"{format_size(self.file_size)} ({self.format}, {self.dtype}{base}) -> {self.output}"
        )
        if self.format == "diffusers":
            lines.append(f"note: {DIFFUSERS_ONLY}")
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
        output=Path(output),
        format=format,
        dtype=dtype_name,
        method=adapter.name,
        base_model=base_model_id(adapter.root),
        layers=[],
        family=unet_family(adapter.root),
    )
    exportable = [name for name, slot in adapter.slots.items() if unsupported_reason(slot.base) is None]
    if format == "kohya":
        keys = kohya_names(adapter.root, exportable)  # before any SVD: a layer without a name fails fast
    else:
        keys = {name: f"{DIFFUSERS_PREFIX}.{name}" for name in exportable}
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
            layer = export_layer(name, keys[name], delta, format, rank, energy, DTYPES[dtype_name], tensors)
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
    key: str,
    delta: torch.Tensor,
    format: str,
    rank: int | None,
    energy: float | None,
    dtype: torch.dtype,
    tensors: dict[str, torch.Tensor],
) -> LayerExport | None:
    """Factor one update, add its tensors under `key` (in `dtype`, on the CPU) to `tensors`; None if it is zero."""
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
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down.cpu().contiguous(), up.cpu().contiguous()
    else:
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


def unet_family(root: nn.Module) -> str | None:
    """ "sdxl", "sd2" or "sd1" for a diffusers UNet2DConditionModel, read from its config; None for other models."""
    config = getattr(root, "config", None)
    if not isinstance(config, Mapping) or "down_block_types" not in config:
        return None
    if config.get("addition_embed_type") == "text_time":  # pooled text + size/crop ids: SDXL's added conditioning
        return "sdxl"
    # SD 2.x: OpenCLIP-H text states (1024 wide) and linear proj_in/proj_out, where SD 1.x has 768 and 1x1 convs.
    if config.get("cross_attention_dim") == 1024 or config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def kohya_names(root: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The kohya key (`lora_unet_...`, no suffix) of each layer of `root` in `names`: LDM names for SDXL."""
    table = ldm_table(root.config) if unet_family(root) == "sdxl" else None
    keys = {name: KOHYA_PREFIX + (name if table is None else ldm_name(name, table)).replace(".", "_") for name in names}
    shared = [key for key, count in Counter(keys.values()).items() if count > 1]
    if shared:
        raise UserError(f"two layers map to the kohya name {shared[0]}; export with --format diffusers")
    return keys


def ldm_name(name: str, table: Mapping[str, str]) -> str:
    """The LDM name of diffusers layer `name`: the `table` entry of its longest listed prefix, then the rest."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return ".".join([table[prefix], *parts[cut:]])
    raise UserError(f"layer '{name}' has no SDXL (LDM) name for a kohya file; export with --format diffusers")


def ldm_table(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers -> LDM names of an SDXL-layout UNet: each resnet, sampler and top-level layer, and each attention block.

    LDM numbers `input_blocks` from conv_in (0) on: each down-block resnet, with its attention, is one
    block, and each downsampler (`op`) a block of its own. `middle_block` is resnet, attention, resnet.
    `output_blocks` hold each up-block resnet with its attention; an upsampler joins the last of its
    up block's output blocks, after the resnet (index 1) and the attention (index 2).
    """
    table = dict(LDM_TOP_LEVEL)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    depth = config["layers_per_block"]
    depths = [depth] * len(down) if isinstance(depth, int) else list(depth)
    index = 1
    for i, kind in enumerate(down):
        for j in range(depths[i]):
            add_ldm_block(table, f"down_blocks.{i}", j, f"input_blocks.{index}", block_attention(kind))
            index += 1
        if i < len(down) - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    mid = config.get("mid_block_type", LDM_MID_BLOCK)
    if mid != LDM_MID_BLOCK:
        raise UserError(f"no SDXL (LDM) names for a UNet with mid block {mid}; export with --format diffusers")
    add_ldm_resnet(table, "mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    add_ldm_resnet(table, "mid_block.resnets.1", "middle_block.2")
    index = 0
    for i, (kind, depth) in enumerate(zip(up, reversed(depths))):
        attention = block_attention(kind)
        for j in range(depth + 1):  # an up block has one resnet more than its down block
            add_ldm_block(table, f"up_blocks.{i}", j, f"output_blocks.{index}", attention)
            index += 1
        if i < len(up) - 1:
            table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{2 if attention else 1}.conv"
    return table


def block_attention(kind: str) -> bool:
    """Whether a down/up block of type `kind` has attentions; a type without LDM names is an error."""
    if kind not in LDM_BLOCK_TYPES:
        raise UserError(f"no SDXL (LDM) names for a UNet with {kind} blocks; export with --format diffusers")
    return LDM_BLOCK_TYPES[kind]


def add_ldm_block(table: dict[str, str], block: str, j: int, ldm: str, attention: bool) -> None:
    """Resnet `j` of diffusers `block` (and attention `j` if it has them) as LDM block `ldm`'s layers 0 (and 1)."""
    add_ldm_resnet(table, f"{block}.resnets.{j}", f"{ldm}.0")
    if attention:
        table[f"{block}.attentions.{j}"] = f"{ldm}.1"  # a prefix: the transformer's layers keep their names


def add_ldm_resnet(table: dict[str, str], resnet: str, ldm: str) -> None:
    for name, ldm_layer in LDM_RESNET.items():
        table[f"{resnet}.{name}"] = f"{ldm}.{ldm_layer}"


def base_metadata(family: str | None, base_model: str) -> dict[str, str]:
    """The sd-scripts header fields naming the base model (A1111 lists SDXL and SD 2.x LoRAs by them)."""
    fields = {}
    if family is not None:
        fields.update(ss_base_model_version=KOHYA_BASE_VERSIONS[family], ss_v2=str(family == "sd2"))
    if base_model:  # sd-scripts writes a local model's file or folder name, a hub id as it is
        fields["ss_sd_model_name"] = Path(base_model).name if Path(base_model).exists() else base_model
    return fields


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
            **base_metadata(report.family, report.base_model),
        )
    with atomic_path(report.output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    report.file_size = report.output.stat().st_size
