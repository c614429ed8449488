"""`personalize cache`: what the cache folder holds (class images, decompositions, form choices), and clearing it."""

from __future__ import annotations

import argparse

from ..cache import KINDS, cache_root, clear, usage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clear",
        nargs="*",
        metavar="KIND",
        choices=KINDS,
        help=f"delete the cache: every kind, or those named ({', '.join(KINDS)}); all are recomputed when needed",
    )


def run(args: argparse.Namespace) -> int:
    if args.clear is not None:
        files, size = clear(tuple(args.clear) or KINDS)
        print(f"cleared {files} file(s), {size / 1e6:.1f} MB from {cache_root()}")
        return 0
    print(f"cache folder: {cache_root()} (set PERSONALIZE_CACHE to move it)")
    for kind, (files, size) in usage().items():
        print(f"  {kind:15s} {files:6d} file(s) {size / 1e6:10.1f} MB")
    return 0
