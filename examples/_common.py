"""Pieces shared by the example scripts: their common flags, one-line errors, and the train / generate /
evaluate steps as the examples chain them (library calls only; each script adds its own workflow)."""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from tqdm import tqdm

import metrics
from metrics.catalog import DEFAULT_METRICS
from personalize import METHODS
from personalize.base_models import DEFAULT_BASE_MODEL
from personalize.commands.progress import TqdmProgress
from personalize.commands.train import parse_options
from personalize.errors import USER_ERRORS, UserError, user_message
from personalize.generate import AdapterSpec, GeneratedImage, generate
from personalize.train import TrainConfig, TrainResult, load_config, train
from personalize.training.config import PRIORS, default_of

INFO_LOGGERS = ("personalize", "metrics", "examples")  # their progress notes are shown; other libraries' only from WARNING

# A few prompts of the DreamBench kinds (recontextualisation, property change, style); {token} and
# {class_noun} are filled from the adapter's training metadata.
DEFAULT_PROMPTS = (
    "a photo of {token} {class_noun}",
    "a {token} {class_noun} on the beach",
    "a {token} {class_noun} in the snow",
    "a watercolor painting of {token} {class_noun}",
)


def make_parser(doc: str | None, epilog: str) -> argparse.ArgumentParser:
    """A parser whose description is the script's docstring and whose epilog shows example commands."""
    return argparse.ArgumentParser(description=doc, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-model",
        default=DEFAULT_BASE_MODEL,
        metavar="MODEL",
        help="Stable Diffusion to personalise: hub id, diffusers folder, .safetensors/.ckpt file, or a built-in: "
        "'shapes' (pretrained on coloured shapes, 32 px, learns a concept offline on a CPU in minutes), "
        "'tiny' (random weights, runs every flow in seconds) (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of training and of the first image of each prompt (image j uses seed+j) (default: %(default)s)",
    )


def add_subject_arguments(parser: argparse.ArgumentParser, script: str) -> None:
    """--class-noun, --prompt and --output of the one-subject scripts (`script`: the script's __file__)."""
    parser.add_argument(
        "--class-noun", default="person", metavar="NOUN", help="the subject's class, e.g. dog, backpack, person (default: %(default)s)"
    )
    parser.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help=f"prompt to generate (repeatable); {{token}} and {{class_noun}} are filled in (default: {' | '.join(DEFAULT_PROMPTS)})",
    )
    parser.add_argument("--output", type=Path, default=default_output(script), metavar="DIR", help="output folder (default: %(default)s)")


def add_training_arguments(parser: argparse.ArgumentParser, steps_help: str) -> None:
    parser.add_argument("--steps", type=int, metavar="N", help=steps_help)
    parser.add_argument("--lr", type=float, metavar="LR", help="learning rate (default: each method's paper value)")
    parser.add_argument("--token", default="sks", help="rare identifier word bound to the subject (DreamBooth) (default: %(default)s)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a method option such as rank=8 or preset=attention (repeatable); every trained method "
        "gets it, so each must accept it (`personalize methods NAME` lists a method's options)",
    )
    parser.add_argument(
        "--prior",
        choices=PRIORS,
        default=default_of("prior"),  # the trainer's default: off, as in diffusers and kohya
        help="class prior preservation: images (generated class images), model (the frozen model's own "
        "prediction, no class images) or none (default: %(default)s)",
    )
    parser.add_argument(
        "--class-images",
        type=int,
        default=default_of("class_images"),
        metavar="N",
        help="class images for --prior images, generated once and cached; never more than a run draws (default: %(default)s)",
    )
    parser.add_argument(
        "--train-config",
        metavar="FILE",
        help="TOML file (or an earlier run's config.json) with any other training settings "
        "(lr, resolution, mixed_precision, validation_every, ...); the flags above win",
    )


def add_generation_arguments(parser: argparse.ArgumentParser, images_per_prompt: int) -> None:
    parser.add_argument(
        "--images-per-prompt",
        type=int,
        default=images_per_prompt,
        metavar="N",
        help="images per prompt, seeds seed..seed+N-1 (default: %(default)s)",
    )
    parser.add_argument("--sample-steps", type=int, default=30, metavar="N", help="denoising steps per image (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        metavar="N",
        help="images rendered together; lower it if the GPU runs out of memory (default: %(default)s)",
    )


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        metavar="LIST",
        help="comma-separated metrics from dino,dinov2,clip_i,clip_t,vendi,kid,fid (default: %(default)s)",
    )
    parser.add_argument(
        "--embedders",
        default="default",
        choices=("default", "shapes", "tiny"),
        help="'default': the real DINO/CLIP/Inception backbones (downloaded once); 'shapes': the shapes-world "
        "judge, for the built-in 'shapes' model; 'tiny': random offline stand-ins whose numbers mean nothing, "
        "for smoke tests (default: %(default)s)",
    )


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: Sequence[str] | None) -> int:
    """Parse `argv` and run; user errors become one line `error: ...` and exit status 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:  # one line, exit status 2 (as the `personalize` command)
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2


def check_generation_arguments(args: argparse.Namespace) -> None:
    """The generation flags, checked before any training so a typo cannot waste a training run."""
    for flag in ("--images-per-prompt", "--sample-steps", "--batch-size"):
        positive(getattr(args, flag[2:].replace("-", "_")), flag)
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise UserError(f"--guidance must be a non-negative number, got {args.guidance}")


def positive(value: int, flag: str) -> int:
    """`value` if it is at least 1, else a UserError naming the flag."""
    if value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value}")
    return value


def parse_pairs(items: Sequence[str], flag: str, what: str) -> dict[str, str]:
    """`KEY=VALUE` strings as a dict, with a UserError naming the malformed item."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"{flag} expects {what}, got '{item}'")
        pairs[key.strip()] = value.strip()
    return pairs


def parse_methods(text: str) -> list[str]:
    """Validated adapter method names from a comma-separated --methods list, in the given order."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise UserError(f"unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'} in --methods; accepted: {', '.join(METHODS)}")
    return names


def prepare_output(folder: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to mix a new run into a folder that holds one, unless asked to replace or continue it."""
    if overwrite and resume:
        raise UserError("choose either --resume (continue the run in --output) or --overwrite (replace it), not both")
    if folder.is_file():
        raise UserError(f"--output must be a folder, got the file '{folder}'")
    if folder.is_dir() and any(folder.iterdir()) and not (overwrite or resume):
        raise UserError(
            f"output folder '{folder}' is not empty; pass --resume to continue its run, --overwrite to "
            "replace it, or choose another --output"
        )


def train_config(
    args: argparse.Namespace, images: str | Path, output_dir: Path, method: str, class_noun: str, **fields: object
) -> TrainConfig:
    """The TrainConfig of one adapter from the shared training flags (+ --train-config and `fields`)."""
    overrides: dict[str, object] = dict(
        instance_images=str(images),
        output_dir=str(output_dir),
        base_model=args.base_model,
        method=method,
        token=args.token,
        class_noun=class_noun,
        prior=args.prior,
        class_images=args.class_images,
        seed=args.seed,
        method_options=parse_options(args.option),
        **fields,
    )
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.lr is not None:
        overrides["lr"] = args.lr
    return load_config(args.train_config, **overrides)


def train_adapter(config: TrainConfig) -> TrainResult:
    """Train one adapter with a progress bar; the result says where its files are."""
    return train(config, callbacks=[TqdmProgress()])


def render(
    pipe, prompts: Sequence[str], adapter: str | Path, args: argparse.Namespace, output_dir: Path, label: str
) -> list[GeneratedImage]:
    """Generate --images-per-prompt images per prompt with one adapter into `output_dir` (PNGs + manifest.jsonl)."""
    if output_dir.exists():
        shutil.rmtree(output_dir)  # the example's own image folder: a rerun replaces its images, never extends them
    num_images = args.images_per_prompt
    with tqdm(total=len(prompts) * num_images, desc=f"generate {label}", unit="img") as bar:
        return generate(
            pipe,
            list(prompts),
            adapters=[AdapterSpec(str(adapter))],
            num_images=num_images,
            seed=args.seed,
            steps=args.sample_steps,
            guidance=args.guidance,
            output_dir=output_dir,
            progress=lambda done, total: bar.update(done - bar.n),
            batch_size=args.batch_size,
        )


def evaluate_run(
    real: str | Path | Mapping[str, Sequence[str | Path]], generated: Path, report_path: Path, args: argparse.Namespace
) -> tuple[dict, dict[str, Path]]:
    """Evaluate one folder of generated images; writes report.json/.md/.png and returns (report, paths)."""
    report = metrics.evaluate(real, generated, metrics=args.metrics, embedders=args.embedders, placeholder_tokens=[args.token])
    return report, metrics.write_report(report, report_path)


@dataclass
class Written:
    """A file the script produced, for the closing 'where are the files' list."""

    what: str
    path: Path


def print_written(files: Sequence[Written]) -> None:
    width = max(len(f.what) for f in files)
    print("\nfiles:")
    for f in files:
        print(f"  {f.what:<{width}}  {f.path}")


def default_output(script: str) -> Path:
    """runs/<script name> under the current folder."""
    return Path("runs") / Path(script).stem
