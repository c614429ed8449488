"""Compare adapter methods on one subject: every method trains on the same photos for the same number of steps
(each at its paper learning rate), generates the same prompts and seeds, and is measured the same way.

Writes into --output: one folder per method (train/, images/, report.json/.md/.png), then
comparison.json / comparison.md / comparison.png (all methods in one table and one plot) and
summary.md: the metrics table with each method's trainable parameters, adapter file size and training time.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import _common as common

import personalize
from metrics import markdown_table, write_comparison
from personalize.atomic import write_text_atomic
from personalize.models import load_pipeline

EPILOG = """examples:
  python examples/compare_adapters.py photos/my_dog --class-noun dog
  python examples/compare_adapters.py photos/my_dog --class-noun dog --methods lora,svfit,loldu --steps 500
  python examples/compare_adapters.py photos/ --base-model tiny --embedders tiny --steps 5 --prior none   # smoke test
"""


@dataclass
class TrainingCost:
    """What one method's adapter cost to train and store."""

    num_trainable: int
    file_bytes: int
    train_time: float  # seconds in the training loop
    steps: int


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__, EPILOG)
    parser.add_argument("images", metavar="IMAGES", help="folder with 3-5 photos of the subject")
    parser.add_argument(
        "--methods",
        default=",".join(personalize.METHODS),
        metavar="LIST",
        help="comma-separated adapter methods to compare (default: all registered: %(default)s)",
    )
    common.add_subject_arguments(parser, __file__)
    parser.add_argument("--resume", action="store_true", help="continue each method's training run in --output from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs in --output")
    common.add_model_arguments(parser)
    common.add_training_arguments(
        parser,
        steps_help="training steps of every method, the same budget for all (default: the largest paper value among the compared methods)",
    )
    common.add_generation_arguments(parser, images_per_prompt=4)
    common.add_evaluation_arguments(parser)
    return parser


def shared_budget(methods: Sequence[str], steps: int | None) -> int:
    """--steps, else the largest paper step count among `methods` (no method trains less than its paper says)."""
    if steps is not None:
        return common.positive(steps, "--steps")
    return max(personalize.get_method(name).train_defaults.steps for name in methods)


def summary_table(reports: Mapping[str, dict], costs: Mapping[str, TrainingCost]) -> str:
    """metrics' comparison table with each run's training cost appended as columns (rows in `reports` order)."""
    header, rule, *rows = markdown_table(reports).splitlines()
    extra = ["trainable params", "adapter file", "train time", "s/step"]
    lines = [header + " " + " | ".join(extra) + " |", rule + " --- |" * len(extra)]
    for row, label in zip(rows, reports):
        cost = costs[label]
        cells = [
            f"{cost.num_trainable:,}",
            f"{cost.file_bytes / 1024:,.1f} KiB",
            f"{cost.train_time:.1f} s",
            f"{cost.train_time / max(cost.steps, 1):.3f}",
        ]
        lines.append(row + " " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    methods = common.parse_methods(args.methods)
    steps = shared_budget(methods, args.steps)
    out: Path = args.output
    common.prepare_output(out, args.overwrite, args.resume)
    common.check_generation_arguments(args)
    print(f"comparing {', '.join(methods)}: {steps} steps each")

    args.steps = steps
    results = {}
    for method in methods:
        config = common.train_config(
            args, args.images, out / method / "train", method, args.class_noun, resume=args.resume, overwrite=args.overwrite
        )
        results[method] = common.train_adapter(config)

    pipe = load_pipeline(args.base_model)
    reports, costs = {}, {}
    prompts = args.prompt or common.DEFAULT_PROMPTS
    for method, result in results.items():
        common.render(pipe, prompts, result.adapter_path, args, out / method / "images", method)
        reports[method], _ = common.evaluate_run(args.images, out / method / "images", out / method / "report.json", args)
        costs[method] = TrainingCost(result.num_trainable, Path(result.adapter_path).stat().st_size, result.train_time, result.steps_done)

    paths = write_comparison(reports, out)
    summary = summary_table(reports, costs)
    write_text_atomic(out / "summary.md", f"# Adapter comparison ({steps} steps each)\n\n{summary}\n")
    print()
    print(summary)
    common.print_written(
        [
            *(common.Written(f"{method} run", out / method) for method in methods),
            *(common.Written(f"comparison ({kind})", path) for kind, path in paths.items()),
            common.Written("summary", out / "summary.md"),
        ]
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
