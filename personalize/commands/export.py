"""`personalize export`: write an adapter file as a standard LoRA for diffusers, A1111 and ComfyUI.

    personalize export --adapter concept.safetensors --format kohya --rank 16 --output concept-lora.safetensors

Prints the rank and relative error of every layer, the overall error, the file size, how many layers
were truncated below their update's rank, which tools read the file and, per learned token, what to
type in each tool's prompt. An adapter with text-encoder parts or learned tokens is exported with its
whole base pipeline (text-encoder layers into the LoRA, tokens into textual-inversion files next to
it); a UNet-only one needs the UNet alone. An existing output is refused unless `--overwrite`.
"""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..export_options import DEFAULT_DTYPE, DEFAULT_ENERGY, DEFAULT_FORMAT, DTYPES, FORMATS, READERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, metavar="FILE", help="adapter file saved by `personalize train`")
    parser.add_argument(
        "--format",
        default=DEFAULT_FORMAT,
        metavar="|".join(FORMATS),
        help="; ".join(f"{name}: loads in {readers}" for name, readers in READERS.items()) + f" (default {DEFAULT_FORMAT})",
    )
    parser.add_argument("--rank", type=int, metavar="R", help="largest LoRA rank per layer (alone: every layer gets min(R, its rank))")
    parser.add_argument(
        "--energy",
        type=float,
        metavar="E",
        help="per layer, the smallest rank keeping this share of the update's squared norm, at most --rank "
        f"(default without --rank: a method of known rank, LoRA, LoHa, LoLDU, AOFT, exactly; others {DEFAULT_ENERGY})",
    )
    parser.add_argument("--output", required=True, metavar="OUT", help="the LoRA file to write (.safetensors)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (and embedding) file; without it one is refused"
    )
    parser.add_argument(
        "--base-model", default=None, help="base model the adapter was trained on (default: the one recorded in the adapter file)"
    )
    parser.add_argument("--device", default=None, help="where to compute the updates and SVDs (default: cuda, then mps, then cpu)")
    parser.add_argument(
        "--dtype", default=DEFAULT_DTYPE, metavar="|".join(DTYPES), help=f"dtype of the stored factors (default {DEFAULT_DTYPE})"
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..export import check_options, check_outputs, export_lora
    from ..io import MAIN_PART, adapter_info
    from ..models import load_pipeline, load_unet

    check_options(args.format, args.output, args.rank, args.energy, args.dtype, source=args.adapter)  # fail before loading a model
    info = adapter_info(args.adapter)
    tokens = [token for vectors in info["tokens"].values() for token in vectors]
    check_outputs(args.output, tokens, source=args.adapter, overwrite=args.overwrite)
    base_model = args.base_model or info["base_model"]
    if not base_model:
        raise UserError(f"adapter '{args.adapter}' does not record its base model; pass --base-model")
    print(f"exporting {info['method']} adapter '{args.adapter}' on {base_model} as a {args.format} LoRA")
    whole = set(info["parts"]) != {MAIN_PART} or bool(info["tokens"])  # text encoders or tokens: the pipeline
    model = load_pipeline(base_model, device=args.device) if whole else load_unet(base_model, device=args.device)
    with tqdm(total=sum(len(part["layers"]) for part in info["parts"].values()), desc="export", unit="layer") as bar:
        report = export_lora(
            model,
            args.adapter,
            args.format,
            output=args.output,
            rank=args.rank,
            energy=args.energy,
            dtype=args.dtype,
            on_layer=lambda done, total, name: bar.update(1),
            overwrite=args.overwrite,
        )
    print(report.table())
    return 0
