"""The metric catalogue: each metric's embedder role, direction and aggregation, and the default set.
Light to import (`personalize eval --help` lists these); the scoring is in `scores.py`."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_METRICS = ("dino", "clip_i", "clip_t", "vendi")


@dataclass(frozen=True)
class MetricSpec:
    """What a metric needs (embedder role, real images or not), its direction, and how it aggregates."""

    role: str
    needs_real: bool
    higher_is_better: bool
    aggregation: str


PAIR_MEAN = "mean over (real, generated) pairs per subject, then mean over subjects; flat = mean over all pairs"
METRICS: dict[str, MetricSpec] = {
    "dino": MetricSpec("dino", True, True, PAIR_MEAN),
    "dinov2": MetricSpec("dinov2", True, True, PAIR_MEAN),
    "clip_i": MetricSpec("clip", True, True, PAIR_MEAN),
    "clip_t": MetricSpec(
        "clip",
        False,
        True,
        "mean over generated images of cos(image, prompt without placeholder tokens) per subject, then mean "
        "over subjects; flat = mean over all images",
    ),
    "vendi": MetricSpec(
        "dinov2",
        False,
        True,
        "Vendi (q=1, cosine kernel) of the generated images per subject, then mean over subjects; "
        "flat = Vendi of all generated images pooled",
    ),
    "kid": MetricSpec(
        "inception",
        True,
        False,
        "pooled over all subjects: unbiased MMD^2 with kernel (x.y/d + 1)^3 on random subsets of size "
        "min(n_real, n_generated); mean and std over subsets",
    ),
    "fid": MetricSpec("inception", True, False, "pooled over all subjects; float64 Frechet distance"),
}
