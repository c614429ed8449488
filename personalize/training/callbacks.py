"""What training reports to its callers (CLI, app, examples): per-step progress, samples and the result.

The trainer knows nothing about its UI: it calls these hooks on the main process only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from .config import TrainConfig


@dataclass
class Progress:
    """One optimiser step, as callbacks receive it."""

    step: int  # steps done, 1-based
    total_steps: int
    loss: float  # training loss of this step (mean over micro-batches and processes)
    lr: float  # learning rate of the main parameter group after this step
    elapsed: float  # seconds of training so far, earlier sessions of a resumed run included
    eta: float  # estimated seconds until the last step


@dataclass
class TrainResult:
    """What a run produced; also written to `result.json` in the output folder."""

    adapter_path: str
    output_dir: str
    steps_done: int
    cancelled: bool
    eval_loss_start: float  # denoising loss on the fixed evaluation set before the first step
    eval_loss_end: float  # the same loss after the last step
    num_trainable: int
    wall_time: float  # seconds this call took, model loading included
    method: str = ""
    total_steps: int = 0
    train_time: float = 0.0  # seconds in the training loop over all sessions of the run
    resumed_from: int | None = None  # checkpoint step this session started from
    num_processes: int = 1
    final_loss: float | None = None  # mean training loss over the last (up to) 10 steps
    samples: list[str] = field(default_factory=list)  # validation grids written by this session
    config_path: str = ""
    curves: list[dict[str, float]] = field(default_factory=list)  # per validation: step and the metric scores
    best_step: int | None = None  # the validation step the selection rule chose (None: nothing was scored)
    best_adapter: str | None = None  # best/adapter.safetensors: the adapter as it was at best_step
    selected_by: str = ""  # the selection rule that chose best_step (TrainConfig.select_by)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Validation:
    """The images of one validation, for callbacks that score them (a metric tracker).

    `images[i]` is `prompts[i]` rendered with seed `seed + i`; `class_images[i]` is the class prompt
    (no token) with the same seed, and `base_class_images[i]` the same rendered by the base model
    before training (both empty unless drift is tracked). A scoring callback adds its numbers to
    `scores` (higher is better, except `drift`); the trainer logs them and selects the best step.
    """

    step: int
    metrics: list[str]  # what to score (TrainConfig.track_metrics, parsed)
    images: list[Image.Image]
    prompts: list[str]
    instance_images: list[str]
    token: str
    class_prompt: str
    class_images: list[Image.Image] = field(default_factory=list)
    base_class_images: list[Image.Image] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)


CLASS_IMAGES_STAGE = "generating class images"  # the preparation stage of prior 'images' (done, total: images)


class TrainCallback:
    """Subclass and override what you need; every method is optional."""

    def on_prepare(self, stage: str, done: int, total: int) -> None:
        """Preparation before the first step, reported at its start (done 0) and after each piece of work:
        e.g. CLASS_IMAGES_STAGE, done 12 of 30 images; 'encoding images'; 'evaluation before training'."""

    def on_start(self, config: TrainConfig, total_steps: int, num_trainable: int) -> None:
        """Training is about to run its first step (of this session)."""

    def on_step(self, progress: Progress) -> None:
        """After every optimiser step."""

    def on_samples(self, step: int, images: list[Image.Image], grid_path: str) -> None:
        """Validation images (fixed prompts and seeds) at `step`, also saved as the grid `grid_path`."""

    def on_validation(self, validation: Validation) -> None:
        """The same validation with what scoring needs; a metric tracker writes into `validation.scores`
        (step 0 is the base model, before the first step)."""

    def on_scores(self, step: int, scores: dict[str, float], best_step: int | None) -> None:
        """The scores of the validation at `step` once logged, and the best step chosen so far."""

    def on_end(self, result: TrainResult) -> None:
        """The run finished (or was cancelled) and its files are written."""


def scores_validations(callback: object) -> bool:
    """Whether `callback` scores validations (implements `on_validation`): only then does the trainer
    render the base model's images before the first step and the class prompt for drift."""
    hook = getattr(type(callback), "on_validation", None)
    return hook is not None and hook is not TrainCallback.on_validation


class CallbackList:
    """Fan one event out to several callbacks; a callback without that hook is skipped (a tracker from
    `metrics` has only the hooks it needs and does not subclass TrainCallback)."""

    def __init__(self, callbacks: Sequence[TrainCallback], enabled: bool) -> None:
        self.callbacks, self.enabled = list(callbacks), enabled

    def __getattr__(self, name: str):
        def call(*args: Any) -> None:
            if self.enabled:
                for callback in self.callbacks:
                    if (hook := getattr(callback, name, None)) is not None:
                        hook(*args)

        return call
