"""The `personalize` command: parses arguments and hands them to one library call per subcommand.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`. Such a
module imports at its top only what its flags need, never torch, diffusers, PIL or tqdm, and the rest in
`run`: help, argument errors, `methods` and `cache` answer in well under a second (tests/test_cli_fast.py).
User errors (`personalize.errors.USER_ERRORS`) print as one line (no traceback) and exit with status 2; `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .allocator import tune_cpu_allocator
from .errors import USER_ERRORS, user_message

# subcommand -> (module, one-line help). eval and app live with their packages (metrics, app).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("personalize.commands.train", "learn a concept from 3-5 images with an adapter"),
    "generate": ("personalize.commands.generate", "generate images with one or more adapters"),
    "eval": ("metrics.command", "evaluate generated images (DINO, CLIP-I, CLIP-T, Vendi, KID, FID)"),
    "bench": ("personalize.commands.bench", "measure speed, memory and size of every adapter method"),
    "masks": ("personalize.commands.masks", "write a loss mask (<image>.mask.png) next to each photo with a segmentation model"),
    "export": ("personalize.commands.export", "export an adapter as a standard LoRA file"),
    "app": ("app.command", "launch the browser app"),
    "methods": ("personalize.commands.methods", "list the adapter methods and their options"),
    "cache": ("personalize.commands.cache", "show or clear the cache (class images, decompositions, measured layer forms)"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="personalize", description="Personalise Stable Diffusion with parameter-efficient adapters.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not module_name.startswith(exc.name or "\0"):
                raise
            continue  # subcommand not available in this installation
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    tune_cpu_allocator()  # before the command allocates anything; help and argument errors skip it
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # anything unexpected still gets one line; --debug shows where
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
