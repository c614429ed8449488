"""The output folder of a run: refuse to mix two runs, replace one on request, and the training log.

A folder "holds a run" when it has any of the run's own files. Without `resume` or `overwrite`
such a folder is refused; `overwrite` deletes only the run's own files (never anything else that
lives there, such as the user's photos); `resume` requires the saved config to agree with the
new one on everything that defines what is learned.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import UserError
from .config import DEFAULTS, RUN_DEFINING, upgrade_legacy

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
LOG_FILE = "log.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
BEST_DIR = "best"  # best/adapter.safetensors: the adapter at the step metric tracking chose
CURVES_FILE = "curves.png"  # the tracked metrics over steps, plotted by the metrics package's tracker
RESOLVED_LATER = ("resolution",)
RUN_FILES = (ADAPTER_FILE, CONFIG_FILE, RESULT_FILE, LOG_FILE, SAMPLES_DIR, CHECKPOINTS_DIR, TENSORBOARD_DIR, BEST_DIR, CURVES_FILE)


def run_files(folder: Path) -> list[Path]:
    return [folder / name for name in RUN_FILES if (folder / name).exists()]


def check_output_dir(folder: Path, effective: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Raise UserError if `folder` holds a run this one must not touch (read-only; safe on every process)."""
    existing = run_files(folder)
    if not existing or overwrite:
        return
    if not resume:
        raise UserError(
            f"output folder '{folder}' already holds a training run ({', '.join(p.name for p in existing)}); "
            "set resume to continue it (--resume), overwrite to replace it (--overwrite), or choose another output_dir"
        )
    saved_path = folder / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = upgrade_legacy(_saved_config(saved_path))
    saved = {**DEFAULTS, **saved}  # a setting added since that run was saved has its default there
    effective = json.loads(json.dumps(effective))  # tuples -> lists, as in the saved file
    # settings resolved from the model (resolution) are compared only when they are given
    differ = [
        name
        for name in RUN_DEFINING
        if saved.get(name) != effective.get(name) and not (name in RESOLVED_LATER and effective.get(name) is None)
    ]
    if differ:
        details = "; ".join(f"{name}: saved {saved.get(name)!r}, now {effective.get(name)!r}" for name in differ)
        raise UserError(
            f"cannot resume the run in '{folder}': it was trained with different settings ({details}); "
            "use the same settings, set overwrite (--overwrite), or choose another output_dir"
        )


def _saved_config(path: Path) -> dict[str, Any]:
    """The settings a run saved in its config.json; a damaged file is a UserError naming it."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise UserError(f"'{path}' is damaged ({exc}); restore it, or start again with overwrite (--overwrite)") from exc
    if not isinstance(saved, dict):
        raise UserError(f"'{path}' is damaged (it holds no table of settings); restore it, or start again with overwrite (--overwrite)")
    return saved


def clear_run(folder: Path) -> None:
    """Delete the run's own files in `folder` (main process; only with overwrite)."""
    for path in run_files(folder):
        log.info("overwrite: removing %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


class TrainLog:
    """`log.jsonl` (always) and TensorBoard scalars/images (with report_to='tensorboard'), main process only."""

    def __init__(self, folder: Path, resume_step: int | None, tracker=None) -> None:
        self.path = folder / LOG_FILE
        self.tracker = tracker
        if resume_step is not None and self.path.is_file():
            # a crash after the last checkpoint leaves records of steps that will be redone (and maybe a
            # torn last line): drop them
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                if (record := _record(line)) is not None and record.get("step", 0) <= resume_step
            ]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()
        if self.tracker is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "event")}
            self.tracker.log(scalars, step=record["step"])

    def records(self, event: str) -> list[dict[str, Any]]:
        """The records of `event` written so far (e.g. the scores kept from before a resume)."""
        self.handle.flush()
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [record for line in lines if (record := _record(line)) is not None and record.get("event") == event]

    def images(self, step: int, images: list) -> None:
        if self.tracker is not None:
            import numpy as np

            self.tracker.log_images({"validation": np.stack([np.asarray(im) for im in images])}, step=step, dataformats="NHWC")

    def close(self) -> None:
        self.handle.close()


def _record(line: str) -> dict[str, Any] | None:
    """One log record, or None for an empty or torn line (a crash mid-write)."""
    try:
        record = json.loads(line)
    except ValueError:
        if line.strip():
            log.warning("log.jsonl: dropping an incomplete line left by an interrupted run")
        return None
    return record if isinstance(record, dict) else None
