"""Export a concept's adapter as a standard LoRA file, as `personalize export` does.

The options are checked first (`personalize.export.check_options`), before any model is touched;
the adapter is applied to its base model (the app's loaded pipeline when it is that model, see
`BaseModel.model_of`; else, as the CLI does, the whole pipeline for a file with text-encoder parts or
tokens, the bare UNet otherwise) and `personalize.export.export_lora` writes the file atomically
and reports each layer's rank and error. Learned tokens go to textual-inversion files named for their
prompt word (`sks.safetensors`, as A1111 and ComfyUI need), in a folder of their own per export
(`<export name>-embeddings/`), so a later export of the concept never meets an earlier one's files.
"""

from __future__ import annotations

from pathlib import Path

from personalize.errors import UserError
from personalize.export import ExportReport, ProgressCallback, check_options, export_lora
from personalize.io import MAIN_PART, adapter_info

from .base_model import BaseModel


def export_adapter(
    base: BaseModel,
    adapter: Path,
    format: str,
    output: Path,
    rank: int | None,
    energy: float | None,
    dtype: str,
    on_layer: ProgressCallback | None = None,
) -> ExportReport:
    """Write `adapter` as a `format` LoRA file at `output`; bad options raise before anything loads."""
    check_options(format, output, rank, energy, dtype, source=adapter)
    info = adapter_info(adapter)
    if not info["base_model"]:
        raise UserError(f"adapter '{adapter}' does not record its base model, so it cannot be exported; train the concept again")
    whole = set(info["parts"]) != {MAIN_PART} or bool(info["tokens"])  # text encoders or tokens: the pipeline
    with base.model_of(info["base_model"], whole) as model:
        return export_lora(
            model,
            adapter,
            format,
            output=output,
            rank=rank,
            energy=energy,
            dtype=dtype,
            on_layer=on_layer,
            embedding_dir=embedding_dir(output),
        )


def embedding_dir(output: Path) -> Path:
    """The folder of one export's textual-inversion files."""
    return output.with_name(f"{output.stem}-embeddings")
