"""The metric catalogue (role, direction, aggregation) and per-metric scoring of subject embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from metrics.frechet import frechet_distance
from metrics.kid import kernel_inception_distance
from metrics.similarity import mean_pairwise_cosine, rowwise_cosine
from metrics.vendi import vendi_score

# subject -> {"real": (n_real, d), "generated": (n_generated, d)}
SubjectEmbeddings = Mapping[str, Mapping[str, torch.Tensor]]


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


def _per_subject(per_subject: dict[str, float], flat: float) -> dict:
    return {"value": float(np.mean(list(per_subject.values()))), "flat": float(flat), "per_subject": per_subject}


def _pooled(emb: SubjectEmbeddings, key: str) -> torch.Tensor:
    return torch.cat([e[key] for e in emb.values()])  # (sum of n over subjects, d)


def score_pair_cosine(emb: SubjectEmbeddings) -> dict:
    """DINO / DINOv2 / CLIP-I: mean cosine over (real, generated) pairs."""
    per_subject = {s: mean_pairwise_cosine(e["real"], e["generated"]) for s, e in emb.items()}
    pairs = {s: len(e["real"]) * len(e["generated"]) for s, e in emb.items()}
    flat = sum(per_subject[s] * pairs[s] for s in emb) / sum(pairs.values())
    return _per_subject(per_subject, flat)


def score_clip_t(emb: SubjectEmbeddings, texts: Mapping[str, torch.Tensor], agreement=rowwise_cosine) -> dict:
    """CLIP-T: mean agreement of each generated image with its own prompt (texts[s]: (n_generated, d));
    the agreement is the cosine unless the embedder defines its own (the shapes judge: a share)."""
    cosines = {s: agreement(e["generated"], texts[s]) for s, e in emb.items()}  # (n_generated,) each
    per_subject = {s: float(c.mean()) for s, c in cosines.items()}
    return _per_subject(per_subject, np.concatenate(list(cosines.values())).mean())


def score_vendi(emb: SubjectEmbeddings) -> dict:
    """Vendi diversity of the generated images, per subject and pooled."""
    per_subject = {s: vendi_score(e["generated"]) for s, e in emb.items()}
    return _per_subject(per_subject, vendi_score(_pooled(emb, "generated")))


def score_kid(emb: SubjectEmbeddings, subsets: int) -> dict:
    """KID over all subjects pooled."""
    kid = kernel_inception_distance(_pooled(emb, "real"), _pooled(emb, "generated"), subsets=subsets)
    return {"value": kid.mean, "std": kid.std, "subsets": subsets}


def score_fid(emb: SubjectEmbeddings) -> dict:
    """FID over all subjects pooled (refused for sets not larger than the feature dimension)."""
    return {"value": frechet_distance(_pooled(emb, "real"), _pooled(emb, "generated"))}
