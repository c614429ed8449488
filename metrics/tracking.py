"""Metric curves while training: score every validation's images, so the numbers can pick the step.

The trainer renders fixed prompts on fixed seeds at each validation (and before the first step, for
the base model). `MetricTracker` scores them with the same code as `personalize eval`, so a value
here equals the report's value for the same images:

- `dino`, `dinov2`, `clip_i`: mean cosine over (instance photo, validation image) pairs;
- `clip_t`: validation images against their prompts with the token removed;
- `vendi`: diversity of the validation images;
- `drift`: 1 - mean cosine between the class prompt's images (no token) now and the base model's on
  the same seeds, embedded by the `dino` backbone (or `clip` when no DINO metric is tracked). 0 = the
  class looks as before; it rises when training moves the class itself (language drift).

Summaries the selection rule reads: `fidelity` = mean of the tracked pair-cosine metrics,
`alignment` = clip_t, `diversity` = vendi.

At the end it plots the curves into the run folder (`curves.png`).

The tracker is a trainer callback by shape (it has `on_start`, `on_validation` and `on_end`, hooks of
`personalize.training.callbacks.TrainCallback`) and imports nothing from `personalize`: the CLI and
the app hand it to the trainer (`tracker_for(config)`). Embedders load once per run, at the start;
the photos are embedded once. Cost per validation on a GPU: one embedding pass over 2 x prompts
images (milliseconds for DINO ViT-S/16 and CLIP ViT-B/32); the extra class-prompt renders for drift
cost as much as the validation renders themselves (the trainer logs both times).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from metrics.catalog import METRICS
from metrics.evaluate import embed_images, resolve_embedders, score_embeddings
from metrics.images import open_image
from metrics.plot import plot_training_curves
from metrics.prompts import strip_placeholders
from metrics.similarity import rowwise_cosine

logger = logging.getLogger(__name__)

FIDELITY = ("dino", "dinov2", "clip_i")  # averaged into `fidelity`
CURVES_FILE = "curves.png"  # written into the run's output folder at the end
TINY_MODELS = ("tiny", "sd15-random")  # random-weight built-ins: the tiny embedders are the honest match


def embedder_set(requested: str, base_model: str) -> str:
    """'auto' -> the shapes judge for the shapes model, tiny embedders for random-weight models, else 'default'."""
    if requested != "auto":
        return requested
    if base_model == "shapes":
        return "shapes"
    return "tiny" if base_model in TINY_MODELS or base_model.startswith("tiny-") else "default"


def drift_role(names: Sequence[str]) -> str:
    """The backbone drift is measured with: DINO, unless only CLIP metrics are tracked besides it."""
    return "clip" if "dino" not in names and any(n in ("clip_i", "clip_t") for n in names) else "dino"


class MetricTracker:
    """Scores validations (see the module docstring); `validation.scores` receives the numbers."""

    def __init__(self, embedders: str | Mapping[str, Any] = "auto") -> None:
        self.requested = embedders
        self.used: dict[str, Any] | None = None  # role -> embedder, loaded at the start of the run
        self.real: dict[str, torch.Tensor] = {}  # role -> (n_photos, d) embeddings of the instance photos
        self.base_drift: torch.Tensor | None = None  # (n_seeds, d) the base model's class images
        self.disabled = False

    def on_start(self, config: Any, total_steps: int, num_trainable: int) -> None:
        names = [n.strip() for n in config.track_metrics.split(",") if n.strip()]
        roles = {METRICS[n].role for n in names if n in METRICS} | ({drift_role(names)} if "drift" in names else set())
        chosen = embedder_set(self.requested, config.base_model) if isinstance(self.requested, str) else self.requested
        try:
            self.used = resolve_embedders(chosen, roles)
            for embedder in self.used.values():  # load the weights now, not in the middle of the run
                embedder.embed_images([blank_image()])
        except Exception as exc:  # noqa: BLE001 - a missing backbone must not stop the training run
            logger.warning("metric tracking is off: its embedders could not be loaded (%s)", exc)
            self.disabled = True

    def on_validation(self, validation: Any) -> None:
        if self.disabled or self.used is None:
            return
        names = [n for n in validation.metrics if n in METRICS]
        if names:
            validation.scores.update(self.score(names, validation))
        if "drift" in validation.metrics and validation.class_images:
            validation.scores["drift"] = self.drift(validation, drift_role(validation.metrics))
        summary(validation.scores)

    def score(self, names: list[str], validation: Any) -> dict[str, float]:
        """The metrics `names` of the validation images, each exactly `personalize eval`'s value."""
        needs_real = {METRICS[n].role for n in names if METRICS[n].needs_real}
        used = {role: self.used[role] for role in {METRICS[n].role for n in names}}
        embeddings = embed_images([], validation.images, used, set())
        for role in needs_real:
            if role not in self.real:
                self.real[role] = used[role].embed_images([open_image(Path(p)) for p in validation.instance_images])
            embeddings[role]["real"] = self.real[role]
        texts = {}
        if "clip_t" in names:
            texts["concept"] = used["clip"].embed_texts([strip_placeholders(p, [validation.token]) for p in validation.prompts])
        report = score_embeddings(names, {"concept": embeddings}, texts, used, kid_subsets=1)
        return {name: report[name]["value"] for name in names}

    def on_end(self, result: Any) -> None:
        """Plot the run's curves next to its adapter (curves.png)."""
        if result.curves:
            title = f"{result.method}: metrics at each validation (chosen by {result.selected_by})"
            plot_training_curves(result.curves, result.best_step, Path(result.output_dir) / CURVES_FILE, title)

    def drift(self, validation: Any, role: str) -> float:
        embedder = self.used[role]
        if self.base_drift is None:
            self.base_drift = embedder.embed_images(validation.base_class_images)  # (n_seeds, d)
        now = embedder.embed_images(validation.class_images)  # (n_seeds, d)
        return float(1.0 - rowwise_cosine(now, self.base_drift).mean())


def summary(scores: dict[str, float]) -> None:
    """Add fidelity / alignment / diversity (the selection rule's inputs) to `scores`."""
    fidelity = [scores[n] for n in FIDELITY if n in scores]
    if fidelity:
        scores["fidelity"] = sum(fidelity) / len(fidelity)
    if "clip_t" in scores:
        scores["alignment"] = scores["clip_t"]
    if "vendi" in scores:
        scores["diversity"] = scores["vendi"]


def blank_image() -> Image.Image:
    return Image.new("RGB", (64, 64), (127, 127, 127))


def tracker_for(config: Any) -> MetricTracker | None:
    """The tracker for a run's TrainConfig, or None when its track_metrics is 'none' or it renders no validation."""
    if config.track_metrics.strip().lower() == "none" or not (config.validation_every and config.validation_prompts):
        return None
    return MetricTracker(config.track_embedders)
