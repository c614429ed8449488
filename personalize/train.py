"""DreamBooth-style training of one adapter on a few photos: `train(TrainConfig(...)) -> TrainResult`.

    from personalize.train import TrainConfig, train
    result = train(TrainConfig(instance_images="photos/", output_dir="out", base_model="tiny", method="svfit"))
    print(result.eval_loss_start, "->", result.eval_loss_end, result.adapter_path)

The output folder holds adapter.safetensors, config.json (the effective config), result.json,
log.jsonl, samples/ (validation grids) and checkpoints/. Progress goes to `TrainCallback`s;
`cancel.set()` stops after the current step and still saves the adapter. Run under
`accelerate launch` for multi-GPU (DDP). The pieces live in `personalize.training`.

Front ends (the CLI, the app, the examples) build configs with `effective_config`: file and
settings merged, the method's paper defaults filled in, every value checked, before any model loads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .allocator import tune_cpu_allocator
from .data import validate_instance_images
from .training.callbacks import Progress, TrainCallback, TrainResult
from .training.config import MIXED_PRECISION, TrainConfig, load_config, resolve
from .training.trainer import Trainer


def effective_config(path: str | Path | None = None, **settings: Any) -> TrainConfig:
    """The config `train` will run: `load_config(path, **settings)` with the method's paper defaults
    (steps, lr) filled in and every value checked; invalid settings raise `UserError`."""
    return resolve(load_config(path, **settings))


def train(config: TrainConfig, callbacks: Sequence[TrainCallback] = (), cancel: threading.Event | None = None) -> TrainResult:
    """Train the adapter described by `config`; invalid input raises `personalize.errors.UserError`."""
    tune_cpu_allocator()
    return Trainer(config, callbacks, cancel).run()


__all__ = [
    "MIXED_PRECISION",
    "Progress",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "effective_config",
    "load_config",
    "train",
    "validate_instance_images",
]
