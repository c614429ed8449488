"""Train one adapter on a folder of photos of one subject, generate a few prompts with it, and measure them.

Writes into --output: train/ (adapter.safetensors, config.json, result.json, log.jsonl, samples/),
images/ (PNGs + manifest.jsonl) and report.json / report.md / report.png (the metrics).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import _common as common

import personalize
from metrics import markdown_table
from personalize.models import load_pipeline

EPILOG = """examples:
  python examples/train_and_generate.py photos/my_dog --class-noun dog
  python examples/train_and_generate.py photos/my_dog --class-noun dog --method svfit --prompt "a {token} {class_noun} on the moon"
  python examples/train_and_generate.py examples/shapes-pink-heart --base-model shapes --embedders shapes --class-noun shape \
      --steps 150 --lr 4e-3 --option preset=attention_convs --prior none --prompt "a {token} {class_noun} on a teal background"  # offline
  python examples/train_and_generate.py photos/ --base-model tiny --embedders tiny --steps 5 --prior none   # smoke test
"""


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__, EPILOG)
    parser.add_argument("images", metavar="IMAGES", help="folder with 3-5 photos of the subject")
    parser.add_argument("--method", default="lora", choices=personalize.METHODS, help="adapter method (default: %(default)s)")
    common.add_subject_arguments(parser, __file__)
    parser.add_argument(
        "--resume", action="store_true", help="continue the training run in --output from its last checkpoint, then generate anew"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --output")
    common.add_model_arguments(parser)
    common.add_training_arguments(parser, steps_help="training steps (default: the method's paper value)")
    common.add_generation_arguments(parser, images_per_prompt=4)
    common.add_evaluation_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    out: Path = args.output
    common.prepare_output(out, args.overwrite, args.resume)
    common.check_generation_arguments(args)
    config = common.train_config(
        args, args.images, out / "train", args.method, args.class_noun, resume=args.resume, overwrite=args.overwrite
    )
    result = common.train_adapter(config)
    print(
        f"trained {args.method}: {result.num_trainable:,} parameters, {result.steps_done} steps in "
        f"{result.train_time:.1f}s; eval loss {result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}"
    )

    pipe = load_pipeline(args.base_model)
    common.render(pipe, args.prompt or common.DEFAULT_PROMPTS, result.adapter_path, args, out / "images", args.method)
    report, paths = common.evaluate_run(args.images, out / "images", out / "report.json", args)
    print()
    print(markdown_table({args.method: report}))
    common.print_written(
        [
            common.Written("adapter", Path(result.adapter_path)),
            common.Written("training run", Path(result.output_dir)),
            common.Written("images", out / "images"),
            *(common.Written(f"report ({kind})", path) for kind, path in paths.items()),
        ]
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
