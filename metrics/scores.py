"""Per-metric scoring of subject embeddings (what each metric is: `catalog.py`)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from metrics.frechet import frechet_distance
from metrics.kid import kernel_inception_distance
from metrics.similarity import mean_pairwise_cosine, rowwise_cosine
from metrics.vendi import vendi_score

# subject -> {"real": (n_real, d), "generated": (n_generated, d)}
SubjectEmbeddings = Mapping[str, Mapping[str, torch.Tensor]]


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
