"""`personalize generate`: prompts x seeds with zero or more adapters (FILE[:SCALE]) -> PNGs + manifest.jsonl.

Prompts, seeds and the output folder are checked before the model loads; a run that fails before
writing an image removes the folders it created.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..base_models import DEFAULT_BASE_MODEL
from ..prompts import MAX_SEED, check_generation

if TYPE_CHECKING:
    from ..generate import AdapterSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-model",
        help="hub id, diffusers folder, .safetensors file, or a built-in ('shapes', 'tiny') "
        f"(default: the first adapter's base model, else {DEFAULT_BASE_MODEL})",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="adapter file with an optional strength (default 1.0); repeat to combine adapters",
    )
    parser.add_argument(
        "--prompt", action="append", required=True, help="prompt (repeatable); {token} and {class_noun} are filled from the adapter"
    )
    parser.add_argument("--negative-prompt", default="", help="negative prompt")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt (seeds S, S+1, ...)")
    parser.add_argument("--seed", type=int, default=0, help=f"seed of the first image of each prompt (0 to {MAX_SEED})")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--resolution", type=int, help="image size in px (default: the model's native size)")
    parser.add_argument("--batch-size", type=int, default=4, help="images rendered together")
    parser.add_argument("--subject", help="subject name written into the manifest (for `personalize eval`)")
    parser.add_argument("--compare", action="store_true", help="also render each seed without adapters and save side-by-side grids")
    parser.add_argument("--output", required=True, help="output folder (an existing manifest is extended)")


def run(args: argparse.Namespace) -> int:
    from ..atomic import make_writable_dir, remove_empty_dirs
    from ..generate import AdapterSpec
    from ..io import adapter_info

    check_generation(args.prompt, args.seed, args.num_images)
    specs = [AdapterSpec.parse(text) for text in args.adapter]
    infos = [adapter_info(spec.path) for spec in specs]  # fails fast on a missing or foreign file
    base_model = args.base_model or (infos[0]["base_model"] if infos else "") or DEFAULT_BASE_MODEL
    created = make_writable_dir(args.output, "--output")  # before the model loads
    try:
        count = _generate(args, specs, base_model)
    except BaseException:
        remove_empty_dirs(created)
        raise
    print(f"{count} images -> {args.output} (manifest.jsonl)")
    return 0


def _generate(args: argparse.Namespace, specs: list[AdapterSpec], base_model: str) -> int:
    from tqdm import tqdm

    from ..generate import generate
    from ..models import load_pipeline

    pipe = load_pipeline(base_model)
    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, desc="generate", unit="img")
        bar.update(done - bar.n)

    try:
        images = generate(
            pipe,
            args.prompt,
            adapters=specs,
            negative_prompt=args.negative_prompt,
            num_images=args.num_images,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            output_dir=args.output,
            compare=args.compare,
            progress=progress,
            subject=args.subject,
            batch_size=args.batch_size,
            resolution=args.resolution,
        )
    finally:
        if bar is not None:
            bar.close()
    return len(images)
