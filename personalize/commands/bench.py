"""`personalize bench`: time, memory and size of every adapter method on one UNet -> bench.json,
a table section in BENCHMARKS.md and a PNG chart of the step-time ratios."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..benchmark.config import PRECISIONS, BenchConfig, parse_method_spec
from ..errors import UserError
from ..training.config import PRIORS

QUICK_STEPS, QUICK_WARMUP = 3, 1  # --quick: a few minutes for every method on a 2-core CPU at 256 px
FULL_STEPS, FULL_WARMUP = BenchConfig.steps, BenchConfig.warmup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD[:K=V,...]",
        help="methods to measure, e.g. svfit loldu:rank=16 atoms:preset=c3 (default: every registered "
        "method); `none` (frozen floor) and `lora` r=4 (reference) are always measured",
    )
    parser.add_argument(
        "--base-model",
        default=BenchConfig.base_model,
        help=f"UNet to measure on: a hub id, folder, file, or a built-in (default: {BenchConfig.base_model})",
    )
    parser.add_argument("--resolution", type=int, default=BenchConfig.resolution, help="image size in pixels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=BenchConfig.batch, help="images per step (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, help=f"timed steps per method, one per interleaved round (default: {FULL_STEPS}; {QUICK_STEPS} with --quick)"
    )
    parser.add_argument("--warmup", type=int, help=f"untimed steps per method first (default: {FULL_WARMUP}; {QUICK_WARMUP} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} timed steps and {QUICK_WARMUP} warm-up per method")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", *PRECISIONS],
        help="autocast dtype; the frozen weights are stored in it too (default: fp16 on GPUs, fp32 on CPU)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward, as low-memory training does"
    )
    parser.add_argument(
        "--forms",
        default=BenchConfig.forms,
        choices=["measure", "model"],
        help="how each adapted layer's forward form is chosen: timed once per machine and cached, or by multiply-add counts "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--text-encoder",
        action="store_true",
        help="also time each method's training step with its adapter on the text encoder(s) too (attention layers, same "
        "options) and its peak memory, against its UNet-only step in the same rounds",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=BenchConfig.seed, help="inputs and built-in weights (default: %(default)s)")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="also write, per method, where a training step's time goes (torch.profiler operators and a per-layer replay) to DIR",
    )
    parser.add_argument("--output", default="bench.json", help="JSON record (default: %(default)s)")
    parser.add_argument(
        "--markdown",
        default="BENCHMARKS.md",
        help="markdown file whose section for this device/precision/resolution is (re)written; '' = none (default: %(default)s)",
    )
    parser.add_argument("--chart", help="PNG chart of the ratios (default: the output path with .png); '' = none")
    parser.add_argument(
        "--quality",
        action="store_true",
        help="instead of speed: train every method on the built-in `shapes` model's held-out concepts and "
        "measure fidelity, alignment and diversity with the shapes judge (minutes per method on a CPU)",
    )
    parser.add_argument(
        "--quality-dir",
        default="outputs/quality",
        metavar="DIR",
        help="--quality: instance images, runs, generated grids (default: %(default)s)",
    )
    parser.add_argument("--concepts", nargs="+", metavar="NAME", help="--quality: concepts to use (default: all)")
    parser.add_argument(
        "--captions",
        action="store_true",
        help="--quality: train on captions naming each instance image's background (<image>.txt) instead of one prompt",
    )
    parser.add_argument("--masks", action="store_true", help="--quality: write each instance image's object mask (masked loss)")
    parser.add_argument(
        "--mask-background-weight",
        type=float,
        default=0.1,
        metavar="W",
        help="--quality: loss weight outside the masks (default: %(default)s)",
    )
    parser.add_argument(
        "--instance-background", metavar="NAME", help="--quality: put every instance image on this one background (default: four)"
    )
    parser.add_argument("--prior", default="none", choices=PRIORS, help="--quality: prior preservation mode (default: %(default)s)")
    parser.add_argument(
        "--train-text-encoder", action="store_true", help="--quality: also adapt the text encoder (same method, the UNet's lr)"
    )
    parser.add_argument(
        "--token-vectors", type=int, default=0, metavar="N", help="--quality: pivotal tuning with N learned token vectors (0 = off)"
    )
    parser.add_argument(
        "--base-images",
        type=int,
        default=64,
        metavar="N",
        help="--quality: images of the base-quality table; 0 = skip it (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    if args.quality:
        return run_quality_command(args)
    from tqdm import tqdm

    from ..benchmark.report import markdown_table, text_table, write_chart, write_json, write_markdown
    from ..benchmark.runner import run_benchmark

    config = BenchConfig(
        methods=args.methods,
        base_model=args.base_model,
        resolution=args.resolution,
        batch=args.batch,
        steps=args.steps if args.steps is not None else QUICK_STEPS if args.quick else FULL_STEPS,
        warmup=args.warmup if args.warmup is not None else QUICK_WARMUP if args.quick else FULL_WARMUP,
        device=args.device,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        threads=args.threads,
        forms=args.forms,
        seed=args.seed,
        profile_dir=args.profile,
        text_encoder=args.text_encoder,
    )
    config.validate()  # before the UNet is built
    for flag, path in (("--output", args.output), ("--markdown", args.markdown), ("--chart", args.chart)):
        if path and Path(path).is_dir():
            raise UserError(f"bench {flag} '{path}' is a folder; accepted: a file path")
    bar = tqdm(total=1, unit="step", desc="loading model")

    def progress(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_description(label)
        bar.refresh()

    try:
        record = run_benchmark(config, progress)
    finally:
        bar.close()
    record["command"] = shlex.join(["personalize", *sys.argv[1:]]) if Path(sys.argv[0]).name == "personalize" else "personalize bench"
    output = Path(args.output)
    chart = None if args.chart == "" else Path(args.chart) if args.chart else output.with_suffix(".png")
    write_json(record, output)
    written = [str(output)]
    if chart is not None:
        write_chart(record, chart)
        written.append(str(chart))
    if args.markdown:
        write_markdown(record, args.markdown, chart)
        written.append(args.markdown)
    print(markdown_table(record))
    if text_table(record):
        print(f"\nWith the text encoder training:\n{text_table(record)}")
    print(f"wrote {', '.join(written)} ({record['total_s']:.0f} s)")
    return 0


def run_quality_command(args: argparse.Namespace) -> int:
    """`bench --quality`: the CLI wires the metrics package's Vendi score into the quality runner."""
    import importlib

    import torch
    from tqdm import tqdm

    from ..benchmark.quality import QualityConfig, markdown, run_quality
    from ..benchmark.report import write_json, write_section
    from ..shapes.world import BACKGROUND_NAMES, CONCEPTS

    known = [c.name for c in CONCEPTS]
    for name in args.concepts or []:
        if name not in known:
            raise UserError(f"unknown concept '{name}'; accepted: {', '.join(known)}")
    specs = [parse_method_spec(text) for text in args.methods or []]  # a typo fails here, before any training
    if any(spec.is_floor for spec in specs):
        raise UserError("--quality has no 'none' method: its table always has the base model (no adapter) row")
    methods = [spec.label for spec in specs] or None
    if args.instance_background and args.instance_background not in BACKGROUND_NAMES:
        raise UserError(f"unknown background '{args.instance_background}'; accepted: {', '.join(BACKGROUND_NAMES)}")
    if args.base_images < 0:
        raise UserError(f"--base-images must be 0 or more, got {args.base_images}")
    config = QualityConfig(
        work_dir=args.quality_dir,
        methods=methods,
        concepts=args.concepts,
        seed=args.seed,
        captions=args.captions,
        masks=args.masks,
        mask_background_weight=args.mask_background_weight,
        instance_background=args.instance_background,
        prior=args.prior,
        base_images=args.base_images,
        train_text_encoder=args.train_text_encoder,
        token_vectors=args.token_vectors,
    )
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    vendi = importlib.import_module("metrics.vendi").vendi_score
    with tqdm(desc="quality", unit="run") as bar:
        record = run_quality(config, vendi, lambda label: (bar.set_description(label), bar.update()))
    record["command"] = (
        shlex.join(["personalize", *sys.argv[1:]]) if Path(sys.argv[0]).name == "personalize" else "personalize bench --quality"
    )
    output = Path(args.output if args.output != "bench.json" else Path(args.quality_dir) / "quality.json")
    write_json(record, output)
    table = markdown(record)
    if args.markdown:
        key, title = ("quality-shapes", "Quality on `shapes`")
        variant = [("captions", "captions naming the background")] if args.captions else []
        if args.instance_background:
            variant.append((f"on-{args.instance_background}", f"instance images on one {args.instance_background} background"))
        if args.masks:
            weight = "" if args.mask_background_weight == 0.1 else f"-bg{args.mask_background_weight:g}"
            variant.append((f"masks{weight}", f"masked loss (background weight {args.mask_background_weight:g})"))
        if args.prior != "none":
            variant.append((f"prior-{args.prior}", f"prior '{args.prior}'"))
        if variant:
            key = "-".join([key] + [k for k, _ in variant])
            title = ", ".join([title] + [t for _, t in variant])
        write_section(args.markdown, key, f"### {title}\n\nCommand: `{record['command']}` ({record['total_s'] / 60:.0f} min)\n\n{table}")
    print(table)
    print(f"wrote {output}, {record['grid']}" + (f", {args.markdown}" if args.markdown else ""))
    return 0
