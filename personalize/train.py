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
On the built-in `shapes` model a run starts from the method's tuned setting there
(`personalize.shapes.recipe`): what the file and the settings do not name comes from it, and the log says so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .allocator import tune_cpu_allocator
from .data import validate_instance_images
from .training.callbacks import Progress, TrainCallback, TrainResult
from .training.config import MIXED_PRECISION, TrainConfig, load_config, read_config_file, resolve
from .training.trainer import Trainer

log = logging.getLogger(__name__)


def effective_config(path: str | Path | None = None, **settings: Any) -> TrainConfig:
    """The config `train` will run: `load_config(path, **settings)` with the method's paper defaults
    (steps, lr) filled in and every value checked; invalid settings raise `UserError`."""
    config = load_config(path, **settings)
    if config.base_model == "shapes" and not config.resume:
        config = load_config(path, **shapes_start(config.method, read_config_file(path) if path else {}, settings))
    return resolve(config)


def shapes_start(method: str, file_values: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` over `method`'s tuned setting on `shapes`: the setting's fields that neither the config file
    nor `settings` name, its method options under theirs."""
    from .shapes import recipe

    tuned = recipe.train_settings(method)
    given = set(file_values) | set(settings)
    start = {k: v for k, v in tuned.items() if k not in given and k != "method_options"}
    options = {**tuned["method_options"], **file_values.get("method_options", {}), **settings.get("method_options", {})}
    setting = recipe.setting(method)
    kind = "tuned setting" if method in recipe.TUNED else "setting of the shapes recipe"
    log.info(
        "base model 'shapes': starting from %s's %s (%s, Min-SNR %g, keep_unconditional %g; from %s); what you set overrides it",
        method,
        kind,
        setting.describe(),
        tuned["snr_gamma"],
        tuned["keep_unconditional"],
        setting.source,
    )
    return {**start, **settings, "method_options": options}


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
