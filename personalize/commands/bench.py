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
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="end within about this many seconds: methods not set up when most of it is spent are left out (the floor and "
        "LoRA never are) and fewer rounds run, the same for every method (default: no limit; --profile runs after it)",
    )
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
    parser.add_argument(
        "--tier",
        default="all",
        choices=["subjects", "outlines", "all"],
        help="--quality: which subjects: made of parts pretraining drew (with the explicit-prompt ceiling), new outlines, "
        "or both tables (default: %(default)s)",
    )
    parser.add_argument(
        "--split",
        default="evaluation",
        choices=["tuning", "evaluation"],
        help="--quality: the subject tier's split; choose settings on tuning, report evaluation (default: %(default)s)",
    )
    parser.add_argument(
        "--concepts", nargs="+", metavar="NAME", help="--quality: subjects or concepts by name, of either tier (default: --tier's)"
    )
    parser.add_argument(
        "--paper-defaults",
        action="store_true",
        help="--quality: also measure each method at its paper default (its own lr and options, the recipe's steps)",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2,...",
        help="--quality: train every method at each setting of a grid on the subject tier's --split and write a sweep table "
        "with the winner per method; KEY is lr_factor, steps, a training setting (batch_size, snr_gamma, prior, ...) or a "
        "method option (rank, preset, ...); repeat for a grid (the product)",
    )
    parser.add_argument("--quality-steps", type=int, metavar="N", help="--quality: training steps per run (default: the shapes recipe's)")
    parser.add_argument("--sample-steps", type=int, metavar="N", help="--quality: denoising steps per generated image (default: 25)")
    parser.add_argument(
        "--captions",
        action="store_true",
        default=None,
        help="--quality: train on captions naming each instance image's background (<image>.txt) instead of one prompt",
    )
    parser.add_argument("--masks", action="store_true", help="--quality: write each instance image's object mask (masked loss)")
    parser.add_argument(
        "--mask-background-weight",
        type=float,
        metavar="W",
        help="--quality: loss weight outside the masks (default: the method's setting, TrainConfig's 0.1)",
    )
    parser.add_argument(
        "--instance-background", metavar="NAME", help="--quality: put every instance image on this one background (default: four)"
    )
    parser.add_argument(
        "--prior", choices=PRIORS, help="--quality: prior preservation mode (default: the method's setting, the recipe's none)"
    )
    parser.add_argument(
        "--train-text-encoder",
        action="store_true",
        default=None,
        help="--quality: also adapt the text encoder (same method, the UNet's lr)",
    )
    parser.add_argument(
        "--token-vectors",
        type=int,
        metavar="N",
        help="--quality: pivotal tuning with N learned token vectors (0 = off; default: the method's setting)",
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
        time_limit=args.time_limit,
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
    """`bench --quality`: the CLI wires the metrics package's Vendi score into the quality runner (or the sweep)."""
    import importlib

    import torch
    from tqdm import tqdm

    from ..adapters import method_names
    from ..atomic import write_text_atomic
    from ..benchmark import sweep as S
    from ..benchmark.quality import QualityConfig, markdown, plan_runs, run_quality
    from ..benchmark.report import write_json, write_section
    from ..shapes.world import BACKGROUND_NAMES

    specs = [parse_method_spec(text) for text in args.methods or []]  # a typo fails here, before any training
    if any(spec.is_floor for spec in specs):
        raise UserError("--quality has no 'none' method: its table always has the base model (no adapter) row")
    methods = [spec.label for spec in specs] or None
    if args.instance_background and args.instance_background not in BACKGROUND_NAMES:
        raise UserError(f"unknown background '{args.instance_background}'; accepted: {', '.join(BACKGROUND_NAMES)}")
    if args.base_images < 0:
        raise UserError(f"--base-images must be 0 or more, got {args.base_images}")
    for flag, value in (("--quality-steps", args.quality_steps), ("--sample-steps", args.sample_steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    counts = {k: v for k, v in (("steps", args.quality_steps), ("sample_steps", args.sample_steps)) if v is not None}
    config = QualityConfig(
        work_dir=args.quality_dir,
        methods=methods,
        tier=args.tier,
        split=args.split,
        concepts=args.concepts,
        paper_defaults=args.paper_defaults,
        seed=args.seed,
        captions=args.captions,
        masks=args.masks,
        mask_background_weight=args.mask_background_weight,
        instance_background=args.instance_background,
        prior=args.prior,
        base_images=args.base_images,
        train_text_encoder=args.train_text_encoder,
        token_vectors=args.token_vectors,
        **counts,
    )
    sweep = None
    if args.sweep:
        if args.tier == "outlines":
            raise UserError("--sweep measures the subject tier (share of ceiling); accepted: --tier subjects or all")
        if args.paper_defaults:
            raise UserError("--sweep starts from each method's tuned setting; --paper-defaults belongs to the quality tables")
        sweep = S.parse_sweep(args.sweep, sorted({spec.name for spec in specs}) or list(method_names()))
        S.plan_sweep(config, sweep)  # every value checked before the progress bar and any training
    else:
        plan_runs(config)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    command = quality_command(args)
    vendi = importlib.import_module("metrics.vendi").vendi_score
    with tqdm(desc="quality", unit="run") as bar:
        progress = lambda label: (bar.set_description(label), bar.update())
        record = S.run_sweep(config, sweep, vendi, progress, command) if sweep else run_quality(config, vendi, progress)
    record["command"] = command
    default_output = Path(args.quality_dir) / ("sweep.json" if sweep else "quality.json")
    output = Path(args.output if args.output != "bench.json" else default_output)
    write_json(record, output)
    table = S.markdown(record) if sweep else markdown(record)
    write_text_atomic(output.with_suffix(".md"), f"Command: `{command}`\n\n{table}\n")
    if args.markdown:
        key, title = quality_section(args)
        write_section(args.markdown, key, f"### {title}\n\nCommand: `{command}` ({record['total_s'] / 60:.0f} min)\n\n{table}")
    print(table)
    grids = [record["grid"]] if sweep else [t["grid"] for t in record["tiers"].values()]
    print(f"wrote {output}, {output.with_suffix('.md')}, {', '.join(grids)}" + (f", {args.markdown}" if args.markdown else ""))
    return 0


def quality_section(args: argparse.Namespace) -> tuple[str, str]:
    """(key, title) of the markdown section of a quality run or sweep: one per variant of the settings."""
    key, title = ("quality-shapes", "Quality on `shapes`")
    variant = []
    if args.sweep:
        keys = [text.partition("=")[0].strip() for text in args.sweep]
        variant.append((f"sweep-{'-'.join(keys)}-{args.split}", f"sweep of {', '.join(keys)} on the {args.split} subjects"))
    elif args.tier != "all" or args.split != "evaluation":
        variant.append((f"{args.tier}-{args.split}", f"{args.tier} tier, {args.split} split"))
    if args.paper_defaults:
        variant.append(("paper", "with paper defaults"))
    if args.captions:
        variant.append(("captions", "captions naming the background"))
    if args.instance_background:
        variant.append((f"on-{args.instance_background}", f"instance images on one {args.instance_background} background"))
    if args.masks:
        weight = args.mask_background_weight
        suffix, note = ("", "") if weight is None else (f"-bg{weight:g}", f" (background weight {weight:g})")
        variant.append((f"masks{suffix}", f"masked loss{note}"))
    if args.prior:
        variant.append((f"prior-{args.prior}", f"prior '{args.prior}'"))
    if variant:
        key = "-".join([key] + [k for k, _ in variant])
        title = ", ".join([title] + [t for _, t in variant])
    return key, title


def quality_command(args: argparse.Namespace) -> str:
    """The command that reproduces this run: `personalize bench` with each option that differs from its default."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    words = ["personalize", "bench"]
    for dest, value in sorted(vars(args).items(), key=lambda item: item[0] != "quality"):  # --quality first, then as declared
        if dest not in defaults or value == defaults[dest]:
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            words.append(flag)
        elif dest == "sweep":  # repeated: one flag per grid axis
            words += [word for item in value for word in (flag, item)]
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)
