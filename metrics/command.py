"""The `personalize eval` subcommand: evaluate a generated folder, write report.json/.md/.png, print the table."""

from __future__ import annotations

import argparse
import sys

from metrics.catalog import DEFAULT_METRICS, METRICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the eval flags to `parser`."""
    parser.add_argument(
        "--real", required=True, metavar="DIR", help="real subject images: a folder, or a folder with one subfolder per subject"
    )
    parser.add_argument(
        "--generated", required=True, metavar="DIR", help="generated images with manifest.jsonl (or PNGs carrying a 'prompt' text field)"
    )
    parser.add_argument(
        "--output", default="report.json", metavar="report.json", help="report path; the .md table and the .png plot are written next to it"
    )
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        metavar="LIST",
        help=f"comma-separated, from: {','.join(METRICS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--embedders",
        default="default",
        choices=("default", "tiny", "shapes"),
        help="'default': the backbones of METRICS.md; 'tiny': random offline stand-ins for smoke tests; "
        "'shapes': the shapes-world judge, for images of the built-in `shapes` model",
    )
    parser.add_argument(
        "--placeholder-token",
        dest="placeholder_tokens",
        action="append",
        metavar="TOKEN",
        help="token removed from prompts before CLIP-T (repeatable); the manifest's tokens are removed anyway",
    )


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; user errors raise ValueError / FileNotFoundError with a one-line message."""
    from metrics.evaluate import evaluate
    from metrics.report import markdown_report, run_label, write_report

    report = evaluate(
        args.real,
        args.generated,
        metrics=args.metrics,
        embedders=args.embedders,
        placeholder_tokens=args.placeholder_tokens,
    )
    paths = write_report(report, args.output)
    sys.stdout.write(markdown_report({run_label(report): report}))
    sys.stdout.write("\nwrote " + ", ".join(str(p) for p in paths.values()) + "\n")
    return 0
