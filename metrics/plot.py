"""Fidelity (DINO) against prompt alignment (CLIP-T) per run, with diversity (Vendi) as marker size."""

from __future__ import annotations

import os
from typing import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metrics.atomic import atomic_target

FIDELITY_KEYS = ("dino", "dinov2", "clip_i")  # first one present is the y axis
LABELS = {"dino": "DINO", "dinov2": "DINOv2", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "vendi": "Vendi"}


def _value(report: Mapping, key: str) -> float | None:
    entry = report.get("metrics", {}).get(key)
    return None if entry is None else float(entry["value"])


def plot_fidelity_alignment(reports: Mapping[str, Mapping], path: os.PathLike | str) -> None:
    """Write a PNG scatter of each run: x = CLIP-T, y = DINO (else DINOv2 / CLIP-I), area ~ Vendi."""
    fidelity = next((k for k in FIDELITY_KEYS if any(_value(r, k) is not None for r in reports.values())), None)
    points = [
        (label, _value(r, "clip_t"), _value(r, fidelity), _value(r, "vendi"))
        for label, r in reports.items()
        if fidelity and _value(r, "clip_t") is not None and _value(r, fidelity) is not None
    ]
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    if not points:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "nothing to plot: needs CLIP-T and one of DINO, DINOv2, CLIP-I", ha="center", va="center", wrap=True)
    else:
        largest = max((v for *_, v in points if v is not None), default=None)
        for label, x, y, vendi in points:
            size = 60.0 if vendi is None or not largest else 40.0 + 400.0 * vendi / largest
            ax.scatter([x], [y], s=size, alpha=0.6)
            note = label if vendi is None else f"{label} (Vendi {vendi:.2f})"
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.set_xlabel("prompt alignment: CLIP-T (higher is better)")
        ax.set_ylabel(f"subject fidelity: {LABELS[fidelity]} (higher is better)")
        ax.set_title("Fidelity vs prompt alignment (marker area ~ Vendi diversity)")
        ax.grid(True, alpha=0.3)
        ax.margins(0.2)
    figure.tight_layout()
    with atomic_target(path) as tmp:
        figure.savefig(tmp, format="png")


CURVES = {"fidelity": "fidelity (to the photos)", "alignment": "prompt alignment", "drift": "class drift (lower is better)"}


def plot_training_curves(curves: list[Mapping], best_step: int | None, path: os.PathLike | str, title: str = "") -> None:
    """Write a PNG of the metric curves a training run tracked (one line per metric over steps), the
    chosen step marked with a vertical line; step 0 is the base model."""
    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for key, label in CURVES.items():
        points = [(p["step"], p[key]) for p in curves if key in p]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle="--", linewidth=1, label=f"chosen step {best_step}")
    ax.set_xlabel("training step (0 = base model)")
    ax.set_ylabel("score")
    ax.set_title(title or "Metrics at each validation")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_target(path) as tmp:
        figure.savefig(tmp, format="png")
