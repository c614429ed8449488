"""`personalize methods`: the adapter methods, their presets, options and paper defaults.

Read from the methods' declarations (`personalize.adapters.declarations`): listing them loads no torch.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..adapters.declarations import declaration, declarations


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", nargs="?", help="show one method in detail")


def run(args: argparse.Namespace) -> int:
    for method in [declaration(args.method)] if args.method else declarations().values():
        defaults = method.train_defaults
        print(f"{method.name:12s} {method.description}")
        if args.method:
            print(f"  presets: {', '.join(method.presets)} (default {method.default_preset})")
            for field in dataclasses.fields(method.config_cls):
                print(f"  --option {field.name}={field.default!r}")
            for note in method.notes:
                print(f"  note: {note}")
            print(f"  training defaults: lr {defaults.lr:g}, {defaults.steps} steps ({defaults.source})")
    return 0
