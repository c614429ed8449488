"""Export any adapter as a standard LoRA file that diffusers, A1111 and ComfyUI load.

Every method here is a weight update `scale * delta` per layer (`Adapter.deltas()`), so a truncated
SVD of each update (`personalize.lowrank`) is a LoRA. A linear update `(out, in)` becomes
`down (r, in)`, `up (out, r)`; a conv update `(out, in, k, k)` becomes LoCon factors,
`down (r, in, k, k)` (a k x k conv to r channels, with the layer's stride and padding) and
`up (out, r, 1, 1)`, exact for any kernel size, 1x1 included.

An adapter with text-encoder parts (`PipelineAdapter`) exports those layers into the same file, and
its learned tokens into textual-inversion files (`embedding_paths`): one per token, holding its vectors
(n_vectors, width) as `emb_params` (SD 1.x/2.x, A1111's key) or `clip_l` / `clip_g` (SDXL's two
encoders), for `pipe.load_textual_inversion` and the embeddings folders of A1111 and ComfyUI. Those two
take the prompt word from the file name (A1111: the name itself; ComfyUI: `embedding:<name>`), so a
file is named after its token (`prompt_words` says what to type in each tool).

Rank per layer (`layer_limits`): `rank` caps it and `energy` picks the smallest rank holding that
share of the update's squared norm. With neither, a layer whose method bounds its update's rank below
the layer's own (`Slot.rank_bound`: LoRA's r, LoHa's r^2, LoLDU's r, AOFT's d) is written exactly at
that rank; the others keep energy 0.99. The report counts the layers cut below their update's rank.

Formats:
- `diffusers`: keys that both diffusers' `pipe.load_lora_weights(file)` and ComfyUI's LoRA loader map
  to layers. UNet attention projections use the attention-processor spelling
  `unet.<block>.attn1.processor.to_q_lora.down.weight` / `.up.weight` (`to_out.0` as
  `processor.to_out_lora`), the other UNet layers `unet.<module>.lora.down.weight` / `.lora.up.weight`.
  diffusers turns both into PEFT names on load (it drops `.processor.`, maps `to_q_lora.down` to
  `to_q.lora_A` and `.lora.down` to `.lora_A`; it converts a UNet state dict only when its first key
  is not PEFT-spelled, so no UNet key is). ComfyUI (comfy/lora.py `model_lora_keys_unet`) maps
  `unet.` + the module path with `.to_` as `.processor.to_` and `to_out.0` as `to_out`, and reads
  `_lora.up` / `.lora.up` factors; it has no name for `unet.<...>.attn1.to_q.lora_A.weight`, PEFT's.
  Text-encoder layers: PEFT keys `text_encoder.text_model.<module>.lora_A.weight` / `.lora_B.weight`
  (and `text_encoder_2.`), which both read (diffusers drops `text_model.` where transformers 5 has none).
  Each part's per-layer ranks, with alpha = rank (scale 1), are stored as a PEFT LoraConfig in the
  `lora_adapter_metadata` header (keys prefixed by the part), which diffusers reads instead of guessing;
  ComfyUI scales a factor pair without an alpha by 1. A1111 does not read this format: it takes a
  key's text before the first dot as the layer name.
- `kohya`: `lora_unet_<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`, named as kohya's
  sd-scripts names them, read by A1111, ComfyUI and diffusers; text-encoder layers as
  `lora_te_text_model_encoder_layers_0_self_attn_q_proj` (SD 1.x/2.x) and `lora_te1_...` /
  `lora_te2_...` (SDXL's two encoders): sd-scripts' names of transformers' CLIP module paths.
  Every layer has alpha 1 (sd-scripts' default), so a loader applies `up @ down / rank`; each
  factor carries `sqrt(rank)` to compensate.
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
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_path
from .errors import UserError
from .export_options import DEFAULT_DTYPE, DEFAULT_ENERGY, DEFAULT_FORMAT, DTYPES, FORMATS, READERS
from .inject import Adapter, base_model_id
from .io import MAIN_PART, read_adapter_file
from .lowrank import factorize, validate_rank_energy
from .pipeline_adapter import PipelineAdapter, load_adapter

if TYPE_CHECKING:
    from .adapters.slots import Slot

log = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
KOHYA_ALPHA = 1.0  # sd-scripts' default --network_alpha; the factors absorb sqrt(rank) each
KOHYA_PREFIX = "lora_unet_"
# sd-scripts' text-encoder prefixes (networks/lora.py): one encoder (SD 1.x/2.x), or SDXL's two.
KOHYA_TEXT_PREFIX = "lora_te_"
KOHYA_SDXL_TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# Textual-inversion file keys: A1111's (SD 1.x/2.x), and SDXL's per encoder (CLIP ViT-L, OpenCLIP ViT-bigG).
EMBEDDING_KEY = "emb_params"
SDXL_EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
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
# The attention projections of a diffusers UNet: the diffusers format spells them as attention-processor LoRAs.
ATTENTION_PROJECTION = re.compile(r"\.(to_q|to_k|to_v|to_out)(\.0)?$")
# Which tools load a file of each format, and where it goes.
ProgressCallback = Callable[[int, int, str], None]  # (layers done, layers in total, layer name)


@dataclass
class LayerExport:
    """One exported layer: its LoRA rank and how far the stored factors are from the update."""

    name: str  # the layer's name in its part's model
    kind: str  # "linear" or "conv<k>x<k>"
    shape: tuple[int, ...]  # the layer's weight shape
    rank: int
    update_rank: int  # the update's own rank: below it the layer is truncated
    full_rank: int  # min(out, in*k*k)
    error: float  # ||delta - exported||_F / ||delta||_F, with the factors as stored (dtype included)
    norm: float  # ||delta||_F
    num_params: int  # numbers stored for this layer
    part: str = MAIN_PART  # the pipeline part it belongs to ("unet", "text_encoder", "text_encoder_2")

    @property
    def label(self) -> str:
        return layer_label(self.part, self.name)

    @property
    def truncated(self) -> bool:
        return self.rank < self.update_rank


def layer_label(part: str, name: str) -> str:
    """How reports name a layer: UNet layers by their name, text-encoder layers prefixed by their part."""
    return name if part == MAIN_PART else f"{part}.{name}"


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
    skipped: dict[str, str] = field(default_factory=dict)  # layer label -> why it is not in the file
    lost_norm2: float = 0.0  # squared norm of updates that could not be exported
    file_size: int = 0
    embeddings: dict[str, Path] = field(default_factory=dict)  # token -> its textual-inversion file
    limits: str = ""  # how ranks were chosen (`limits_text`)

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers)

    @property
    def error(self) -> float:
        """Relative Frobenius error over all target layers together (unexported updates count in full)."""
        total = sum(layer.norm**2 for layer in self.layers) + self.lost_norm2
        missing = sum((layer.error * layer.norm) ** 2 for layer in self.layers) + self.lost_norm2
        return math.sqrt(missing / total) if total > 0 else 0.0

    @property
    def truncated(self) -> list[LayerExport]:
        """The layers kept below their update's rank."""
        return [layer for layer in self.layers if layer.truncated]

    def truncation(self) -> str:
        """How many layers were cut below their update's rank, and their relative errors."""
        cut = sorted(layer.error for layer in self.truncated)
        if not cut:
            return f"no layer truncated: each keeps its update's whole rank ({self.limits}); what error is left is {self.dtype} rounding"
        return (
            f"{len(cut)} of {len(self.layers)} layers truncated below their update's rank ({self.limits}): "
            f"relative error {cut[0]:.2e} to {cut[-1]:.2e}"
        )

    def readers(self) -> str:
        return f"loads in {READERS[self.format]}"

    def table(self) -> str:
        """Per-layer ranks and errors, then the totals, truncation, the tools that read the file and the tokens, as plain text."""
        width = max([len(layer.label) for layer in self.layers] + [5])
        lines = [f"{'layer':{width}s}  {'kind':8s} {'weight shape':18s} {'rank':>5s} {'update':>6s} {'full':>5s}  rel. error"]
        for layer in self.layers:
            shape = "x".join(str(d) for d in layer.shape)
            lines.append(
                f"{layer.label:{width}s}  {layer.kind:8s} {shape:18s} {layer.rank:5d} {layer.update_rank:6d} {layer.full_rank:5d}  "
                f"{layer.error:.2e}"
            )
        for name, reason in self.skipped.items():
            lines.append(f"not exported: {name} ({reason})")
        base = f", {KOHYA_BASE_VERSIONS[self.family]} base" if self.format == "kohya" and self.family else ""
        lines.append(
            f"{len(self.layers)} layers, {self.num_params:,} parameters, overall relative error {self.error:.2e}, "
            f"{format_size(self.file_size)} ({self.format}, {self.dtype}{base}) -> {self.output}"
        )
        lines.append(self.truncation())
        lines.append(f"{self.format} format: {self.readers()}")
        for token, path in self.embeddings.items():
            lines.append(f"token '{token}': textual-inversion embedding -> {path}; {embedding_note(token, path)}")
        return "\n".join(lines)


def prompt_words(token: str, path: Path) -> dict[str, str]:
    """What to type in a prompt, per tool, for the learned `token` whose textual-inversion file is `path`:
    A1111 names an embedding by its file name, ComfyUI reads `embedding:<file name>`, diffusers the token
    given to `load_textual_inversion`."""
    return {"A1111": path.stem, "ComfyUI": f"embedding:{path.stem}", "diffusers": token}


def embedding_note(token: str, path: Path) -> str:
    """Where each tool takes the embedding file and what its prompt says instead of the token."""
    words = prompt_words(token, path)
    return (
        f"in the prompt write '{words['A1111']}' in A1111 (file in embeddings/), '{words['ComfyUI']}' in ComfyUI "
        f"(file in models/embeddings/), '{words['diffusers']}' in diffusers (pipe.load_textual_inversion(file, token='{token}'))"
    )


def limits_text(rank: int | None, energy: float | None) -> str:
    """The rank options of an export, as the report words them."""
    if rank is None and energy is None:
        return f"default: exact where the method bounds the update's rank, else energy {DEFAULT_ENERGY}"
    chosen = [f"energy {energy}"] if energy is not None else []
    return ", ".join(chosen + ([f"rank at most {rank}"] if rank is not None else []))


def layer_limits(slot: Slot, shape: tuple[int, ...], rank: int | None, energy: float | None) -> tuple[int | None, float | None]:
    """The rank cap and energy of one layer's factorisation: the options where given. By default the
    method's rank bound where it is below the layer's own (the update is written exactly), else energy
    DEFAULT_ENERGY (the update is about full rank: its whole rank would make a file as large as the weights)."""
    if rank is not None or energy is not None:
        return rank, energy
    bound = slot.rank_bound()
    if bound is not None and bound < min(shape[0], math.prod(shape[1:])):
        return bound, None
    return None, DEFAULT_ENERGY


def lora_config(report: ExportReport, part: str) -> dict[str, Any]:
    """The PEFT LoraConfig fields of one part's layers: the most common rank, and the others by pattern.

    PEFT matches a pattern to a module name as `(.*\\.)?(pattern)$`. UNet patterns are anchored
    (`^name`, diffusers' own style); text-encoder ones are the escaped name alone, since transformers 4
    nests the layers under `text_model.` and 5 does not."""
    ranks = {layer.name: layer.rank for layer in report.layers if layer.part == part}
    common = Counter(ranks.values()).most_common(1)[0][0]
    spell = (lambda name: f"^{name}") if part == MAIN_PART else re.escape
    pattern = {spell(name): r for name, r in ranks.items() if r != common}
    return {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": pattern, "target_modules": sorted(ranks)}


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
        names = {value: key for key, value in TORCH_DTYPES.items()}
        if dtype not in names:
            raise UserError(f"unsupported export dtype {dtype}; accepted: {', '.join(DTYPES)}")
        return names[dtype]
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype '{dtype}'; accepted: {', '.join(DTYPES)}")
    return dtype


def export_lora(
    pipe_or_unet: Any,
    adapter_path: str | Path,
    format: str = DEFAULT_FORMAT,
    *,
    output: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | torch.dtype = DEFAULT_DTYPE,
    on_layer: ProgressCallback | None = None,
    overwrite: bool = False,
    embedding_dir: str | Path | None = None,
) -> ExportReport:
    """Write the adapter file `adapter_path`, applied to its base model, as a LoRA file (and its
    tokens as textual-inversion files in `embedding_dir`, by default the output's folder).
    `pipe_or_unet`: the base pipeline, whose text encoders a file with text-encoder parts or tokens
    needs, or for a UNet-only file the bare UNet.

    Each layer keeps the fewest singular triplets that hold `energy` of its update's squared
    Frobenius norm, and at most `rank` of them; with neither given, see `layer_limits`. An existing
    output or embedding file is refused unless `overwrite`. The model is left as it was.
    """
    check_options(format, output, rank, energy, dtype, source=adapter_path)
    tokens = [token for tokens in read_adapter_file(adapter_path).tokens.values() for token in tokens]
    check_outputs(output, tokens, source=adapter_path, overwrite=overwrite, embedding_dir=embedding_dir)
    adapter = load_adapter(pipe_or_unet, adapter_path)
    try:
        return export_adapter(
            adapter,
            format,
            output=output,
            rank=rank,
            energy=energy,
            dtype=dtype,
            on_layer=on_layer,
            overwrite=overwrite,
            embedding_dir=embedding_dir,
        )
    finally:
        adapter.detach()


def check_outputs(
    output: str | Path,
    tokens: Iterable[str],
    *,
    source: str | Path | None = None,
    overwrite: bool = False,
    embedding_dir: str | Path | None = None,
) -> dict[str, Path]:
    """The textual-inversion file of each token (`embedding_paths`), after refusing a file that is the
    adapter file `source` or the LoRA output, and, unless `overwrite`, a file that exists already."""
    output = Path(output)
    paths = embedding_paths(output.parent if embedding_dir is None else embedding_dir, tokens)
    for token, path in paths.items():
        if source is not None and path.resolve() == Path(source).resolve():
            raise UserError(
                f"the embedding of token '{token}' would be written to '{path}', the adapter file itself; choose another output name"
            )
        if path.resolve() == output.resolve():
            raise UserError(
                f"the embedding of token '{token}' is named '{path.name}' (A1111 and ComfyUI take the prompt word from the file name), "
                f"which is the LoRA output itself; choose another output name"
            )
    if not overwrite:
        for token, path in [(None, output), *paths.items()]:
            if path.exists():
                what = "output" if token is None else f"the embedding file of token '{token}',"
                raise UserError(f"{what} '{path}' already exists; choose another output name or pass --overwrite to replace it")
    return paths


@torch.no_grad()
def export_adapter(
    adapter: Adapter | PipelineAdapter,
    format: str = DEFAULT_FORMAT,
    *,
    output: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | torch.dtype = DEFAULT_DTYPE,
    on_layer: ProgressCallback | None = None,
    overwrite: bool = False,
    embedding_dir: str | Path | None = None,
) -> ExportReport:
    """Export an attached adapter (at its current `scale`) as a LoRA file; see `export_lora`."""
    dtype_name = check_options(format, output, rank, energy, dtype)
    whole = isinstance(adapter, PipelineAdapter)
    parts = adapter.parts if whole else {MAIN_PART: adapter}
    unet = adapter.pipe.unet if whole else adapter.root
    tokens = adapter.tokens.vectors() if whole and adapter.tokens is not None else {}
    paths = check_outputs(output, [t for vectors in tokens.values() for t in vectors], overwrite=overwrite, embedding_dir=embedding_dir)
    tensors: dict[str, torch.Tensor] = {}
    methods = {part: part_adapter.name for part, part_adapter in parts.items()}
    method = next(iter(methods.values()), "")  # "unet: svfit, text_encoder: lora" when the parts differ
    if len(set(methods.values())) > 1:
        method = ", ".join(f"{part}: {name}" for part, name in methods.items())
    report = ExportReport(
        output=Path(output),
        format=format,
        dtype=dtype_name,
        method=method,
        base_model=base_model_id(unet),
        layers=[],
        family=unet_family(unet),
        limits=limits_text(rank, energy),
    )
    keys = {part: lora_keys(part, part_adapter, format, report.family) for part, part_adapter in parts.items()}  # before any SVD
    total, done = sum(len(part_adapter.slots) for part_adapter in parts.values()), 0
    for part, part_adapter in parts.items():
        for name, slot in part_adapter.slots.items():
            label = layer_label(part, name)
            delta = slot.delta()  # (out, in) or (out, in, k, k), float32
            if not bool(torch.isfinite(delta).all()):
                raise UserError(f"the update of layer '{label}' holds NaN or infinite values (a diverged training run?); nothing exported")
            reason = unsupported_reason(slot.base)
            if reason is not None:
                report.skipped[label] = reason
                report.lost_norm2 += float(delta.double().norm()) ** 2
            else:
                layer_rank, layer_energy = layer_limits(slot, tuple(delta.shape), rank, energy)
                layer = export_layer(name, keys[part][name], delta, layer_rank, layer_energy, TORCH_DTYPES[dtype_name], tensors)
                if layer is None:
                    report.skipped[label] = "its update is zero"
                else:
                    layer.part = part
                    report.layers.append(layer)
            done += 1
            if on_layer is not None:
                on_layer(done, total, label)
    if not report.layers:
        raise UserError(
            f"nothing to export: the adapter's update is zero or unsupported on every layer "
            f"({', '.join(sorted(set(report.skipped.values()))) or 'it adapts no layer'})"
        )
    write(report, tensors)
    write_embeddings(report, tokens, paths, TORCH_DTYPES[dtype_name])
    log.info(
        "exported %d layers to %s (%s), overall relative error %.2e; %s",
        len(report.layers),
        report.output,
        format_size(report.file_size),
        report.error,
        report.truncation(),
    )
    return report


@dataclass(frozen=True)
class LoraKeys:
    """The file keys of one layer's factors (and of its alpha, kohya only)."""

    down: str
    up: str
    alpha: str | None = None


def lora_keys(part: str, adapter: Adapter, format: str, family: str | None) -> dict[str, LoraKeys]:
    """The keys of each exportable layer of one part, in `format` (module docstring)."""
    names = [name for name, slot in adapter.slots.items() if unsupported_reason(slot.base) is None]
    if format == "kohya":
        if part == MAIN_PART:
            stems = kohya_names(adapter.root, names)
        else:
            prefix = KOHYA_SDXL_TEXT_PREFIXES[part] if family == "sdxl" or part != "text_encoder" else KOHYA_TEXT_PREFIX
            stems = {name: f"{prefix}text_model_{name.replace('.', '_')}" for name in names}
        return {name: LoraKeys(f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha") for name, stem in stems.items()}
    if part == MAIN_PART:
        return {name: diffusers_unet_keys(name) for name in names}
    return {name: LoraKeys(f"{part}.text_model.{name}.lora_A.weight", f"{part}.text_model.{name}.lora_B.weight") for name in names}


def diffusers_unet_keys(name: str) -> LoraKeys:
    """A UNet layer's diffusers-format keys: attention projections as attention-processor LoRAs
    (`unet.<block>.attn1.processor.to_q_lora.down.weight`), other layers `unet.<module>.lora.down.weight`."""
    match = ATTENTION_PROJECTION.search(name)
    if match is None:
        return LoraKeys(f"unet.{name}.lora.down.weight", f"unet.{name}.lora.up.weight")
    stem = f"unet.{name[: match.start()]}.processor.{match.group(1)}_lora"
    return LoraKeys(f"{stem}.down.weight", f"{stem}.up.weight")


def embedding_paths(directory: str | Path, tokens: Iterable[str]) -> dict[str, Path]:
    """Where each token's textual-inversion file goes: `<directory>/<word>.safetensors`, the word being the
    token less characters other than letters, digits, `_` and `-` (`<sks>` -> `sks`): A1111 and ComfyUI
    take the prompt word from the file name (`prompt_words`). A second token with the same word gets `-2`."""
    directory = Path(directory)
    paths: dict[str, Path] = {}
    for token in dict.fromkeys(tokens):
        stem = re.sub(r"[^0-9A-Za-z_-]+", "", token) or "token"
        path, count = directory / f"{stem}.safetensors", 1
        while path in paths.values():
            count += 1
            path = directory / f"{stem}-{count}.safetensors"
        paths[token] = path
    return paths


def write_embeddings(
    report: ExportReport, tokens: Mapping[str, Mapping[str, torch.Tensor]], paths: Mapping[str, Path], dtype: torch.dtype
) -> None:
    """One textual-inversion file per token at `paths[token]` (module docstring), written atomically; recorded in `report.embeddings`."""
    by_token: dict[str, dict[str, torch.Tensor]] = {}
    for part, vectors in tokens.items():
        for token, value in vectors.items():
            by_token.setdefault(token, {})[part] = value
    sdxl = report.family == "sdxl" or "text_encoder_2" in tokens
    for token, found in by_token.items():
        path = paths[token]
        if sdxl:
            tensors = {SDXL_EMBEDDING_KEYS[part]: value for part, value in found.items()}
        else:
            tensors = {EMBEDDING_KEY: found["text_encoder"]}
        with atomic_path(path) as tmp:
            save_file({key: value.to("cpu", dtype).contiguous() for key, value in tensors.items()}, str(tmp), metadata={"format": "pt"})
        report.embeddings[token] = path


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer's update has no LoRA form in either format, or None if it has one."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        return None if module.groups == 1 else f"grouped conv (groups={module.groups}) has no LoRA form"
    return f"{type(module).__name__} layers have no LoRA form (only Linear and Conv2d)"


def export_layer(
    name: str,
    keys: LoraKeys,
    delta: torch.Tensor,
    rank: int | None,
    energy: float | None,
    dtype: torch.dtype,
    tensors: dict[str, torch.Tensor],
) -> LayerExport | None:
    """Factor one update, add its tensors under `keys` (in `dtype`, on the CPU) to `tensors`; None if it is zero."""
    matrix = delta.reshape(delta.shape[0], -1)  # (out, in*k*k)
    low = factorize(matrix, rank=rank, energy=energy)
    if low.rank == 0:
        return None
    # kohya loaders apply alpha/rank to up @ down: give each factor sqrt(rank/alpha) to undo it.
    factor_scale = math.sqrt(low.rank / KOHYA_ALPHA) if keys.alpha is not None else 1.0
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
    tensors[keys.down], tensors[keys.up] = down.cpu().contiguous(), up.cpu().contiguous()
    if keys.alpha is not None:
        tensors[keys.alpha] = torch.tensor(KOHYA_ALPHA, dtype=torch.float32)
    return LayerExport(
        name=name,
        kind=kind,
        shape=tuple(delta.shape),
        rank=low.rank,
        update_rank=low.matrix_rank,
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
    ranks = {layer.label: layer.rank for layer in report.layers}
    common = Counter(ranks.values()).most_common(1)[0][0]
    if report.format == "diffusers":
        config = {}
        for part in dict.fromkeys(layer.part for layer in report.layers):
            config.update({f"{part}.{key}": value for key, value in lora_config(report, part).items()})
        metadata["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
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
