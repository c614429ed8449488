"""`personalize train`: flags (or a TOML file via --config, flags win) -> TrainConfig -> train().

Every TrainConfig field is a flag (`steps` -> `--steps`, booleans as `--x/--no-x`); method
options are `--option NAME=VALUE` (repeatable).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import signal
import sys
import threading
import typing

from tqdm import tqdm

from ..errors import UserError
from ..train import Progress, TrainCallback, TrainConfig, TrainResult, effective_config, train
from ..training.callbacks import CLASS_IMAGES_STAGE
from ..training.config import FIELDS, RENAMED

SHORT = {"output_dir": ["--output"]}  # extra spellings of some flags
CURVE_COLUMNS = ("fidelity", "alignment", "diversity", "drift")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file (or config.json of an earlier run) with training settings; flags override it"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a method option, e.g. --option rank=8 (repeatable; see `personalize methods NAME`)",
    )
    parser.add_argument(
        "--text-encoder-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the text-encoder method, e.g. --text-encoder-option rank=4 (repeatable; with --train-text-encoder)",
    )
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("method_options", "text_encoder_options"):
            continue
        flags = ["--" + field.name.replace("_", "-")] + SHORT.get(field.name, [])
        kwargs: dict = {"dest": field.name, "default": argparse.SUPPRESS, "help": _help(field)}
        hint = hints[field.name]
        kinds = set(typing.get_args(hint)) or {hint}
        if bool in kinds:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.name in ("instance_images", "validation_prompts"):
            kwargs.update(nargs="+", metavar="PATH" if field.name == "instance_images" else "PROMPT")
        else:
            kwargs["type"] = int if int in kinds else float if float in kinds else str
        parser.add_argument(*flags, **kwargs)
    for old in RENAMED:  # flags of earlier versions keep working, unlisted
        flag = "--" + old.replace("_", "-")
        parser.add_argument(flag, dest=old, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)


def _help(field: dataclasses.Field) -> str:
    text = field.metadata.get("help", "")
    if field.default is not dataclasses.MISSING and field.default is not None and not isinstance(field.default, bool):
        text += f" (default: {field.default})"
    return text.replace("%", "%%")


def parse_options(items: list[str]) -> dict[str, str]:
    """NAME=VALUE pairs as text (one layer of matching quotes removed); the method's config types
    them (`personalize.options`), as it does for TOML values, the app's table and `attach()`."""
    options: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--option expects NAME=VALUE, got '{item}'")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        options[name.strip()] = value
    return options


class TqdmProgress(TrainCallback):
    """A progress bar for each preparation stage (class images, encoding, evaluation) and the training steps."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.stage: str | None = None

    def on_prepare(self, stage: str, done: int, total: int) -> None:
        """One bar per stage; its rate and ETA count from the stage's first report (class images report 0 first)."""
        if self.stage != stage:
            self._close()
            unit = "image" if stage == CLASS_IMAGES_STAGE else "it"
            self.bar, self.stage = tqdm(total=total, initial=done, desc=stage, unit=unit), stage
        else:
            self.bar.update(done - self.bar.n)

    def on_start(self, config: TrainConfig, total_steps: int, num_trainable: int) -> None:
        self._close()
        print(
            f"training {config.method} ({num_trainable:,} trainable parameters) on {len(config.instance_images)} images, "
            f"{total_steps} steps at lr {config.lr:g}, {config.resolution} px -> {config.output_dir}"
        )
        self.bar = tqdm(total=total_steps, desc="train", unit="step")

    def on_step(self, progress: Progress) -> None:
        self.bar.n = progress.step
        self.bar.set_postfix(loss=f"{progress.loss:.4f}", lr=f"{progress.lr:.2g}", refresh=False)
        self.bar.refresh()

    def on_samples(self, step: int, images: list, grid_path: str) -> None:
        tqdm.write(f"step {step}: samples -> {grid_path}")

    def on_scores(self, step: int, scores: dict[str, float], best_step: int | None) -> None:
        shown = ", ".join(f"{name} {scores[name]:.3f}" for name in CURVE_COLUMNS if name in scores)
        tqdm.write(f"step {step}: {shown}" + (f" (best so far: step {best_step})" if best_step is not None else ""))

    def on_end(self, result: TrainResult) -> None:
        """The summary (only the main process gets this call, so a multi-GPU run prints it once)."""
        self._close()
        state = "cancelled" if result.cancelled else "done"
        print(
            f"{state}: {result.steps_done}/{result.total_steps} steps in {result.wall_time:.1f}s; "
            f"eval loss {result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}"
        )
        if result.curves:
            print(curve_table(result.curves, result.best_step, result.selected_by))
        print(f"adapter: {result.adapter_path}")
        if result.best_adapter:
            print(f"best step {result.best_step}: {result.best_adapter}")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.stage = None


def curve_table(curves: list[dict[str, float]], best_step: int | None, rule: str) -> str:
    """The metric curve as a text table, the chosen step marked."""
    columns = [name for name in CURVE_COLUMNS if any(name in point for point in curves)]
    lines = [f"{'step':>8}  " + "  ".join(f"{name:>9}" for name in columns)]
    for point in curves:
        values = "  ".join(f"{point[name]:9.3f}" if name in point else f"{'-':>9}" for name in columns)
        mark = f"  <- best ({rule})" if point["step"] == best_step else ("  (base model)" if point["step"] == 0 else "")
        lines.append(f"{point['step']:>8}  {values}{mark}")
    return "\n".join(lines)


def metric_trackers(config: TrainConfig) -> list:
    """The metrics package's tracker for this run (metrics plugs in here; the library never imports it)."""
    try:
        tracking = importlib.import_module("metrics.tracking")
    except ModuleNotFoundError:
        log.warning("metric tracking is off: the metrics package is not installed")
        return []
    tracker = tracking.tracker_for(config)
    return [tracker] if tracker is not None else []


def run(args: argparse.Namespace) -> int:
    overrides = {name: value for name, value in vars(args).items() if name in FIELDS or name in RENAMED}
    overrides["method_options"] = parse_options(args.option)
    if args.text_encoder_option:
        overrides["text_encoder_options"] = parse_options(args.text_encoder_option)
    config = effective_config(args.config, **overrides)
    cancel = threading.Event()

    def stop(signum, frame) -> None:  # first Ctrl-C: finish this step and save; second: abort
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("\nstopping after this step and saving the adapter (Ctrl-C again to abort)", file=sys.stderr)

    in_main_thread = threading.current_thread() is threading.main_thread()  # signals can only be caught there
    previous = signal.signal(signal.SIGINT, stop) if in_main_thread else None
    try:
        train(config, callbacks=[TqdmProgress(), *metric_trackers(config)], cancel=cancel)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    return 0
