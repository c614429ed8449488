"""`evaluate`: personalization metrics of generated images against real subject images, as a report dict."""

from __future__ import annotations

import datetime
import logging
from typing import Iterable, Mapping, Sequence, Union

import torch
from PIL import Image

from metrics.catalog import DEFAULT_METRICS, METRICS
from metrics.embedders import ImageEmbedder, default_embedders, shapes_embedders, tiny_embedders
from metrics.frechet import check_frechet_sizes
from metrics.images import open_image
from metrics.inputs import GeneratedImage, PathLike, RealSource, group_by_subject, read_generated, read_real
from metrics.prompts import strip_placeholders
from metrics.scores import score_clip_t, score_fid, score_kid, score_pair_cosine, score_vendi
from metrics.similarity import rowwise_cosine

logger = logging.getLogger(__name__)

REPORT_FORMAT = "personalize-metrics-report/1"
Embedders = Union[str, Mapping[str, ImageEmbedder]]


def parse_metrics(metrics: Union[str, Iterable[str]]) -> list[str]:
    """Validated metric names, from an iterable or a comma-separated string, in the given order."""
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = list(dict.fromkeys(m for m in names if m))
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown)) or '(none given)'}; accepted: {', '.join(METRICS)}")
    return names


def resolve_embedders(embedders: Embedders, roles: set[str]) -> dict[str, ImageEmbedder]:
    """The embedder for each needed role from "default", "tiny", "shapes", or a role -> embedder mapping."""
    if isinstance(embedders, str):
        sets = {"default": default_embedders, "tiny": tiny_embedders, "shapes": shapes_embedders}
        if embedders not in sets:
            raise ValueError(f"unknown embedder set {embedders!r}; accepted: {', '.join(sets)}, or a dict role -> embedder")
        embedders = sets[embedders]()
    missing = sorted(roles - set(embedders))
    if missing:
        raise ValueError(f"no embedder for role(s) {', '.join(missing)}; the embedders dict needs keys {', '.join(sorted(roles))}")
    return {role: embedders[role] for role in sorted(roles)}


def embed_images(
    real_images: Sequence[Image.Image],
    generated_images: Sequence[Image.Image],
    embedders: Mapping[str, ImageEmbedder],
    real_roles: set[str],
) -> dict[str, dict[str, torch.Tensor]]:
    """role -> {"generated": (n_generated, d), and "real": (n_real, d) for roles that need real images}."""
    out = {}
    for role, embedder in embedders.items():
        out[role] = {"generated": embedder.embed_images(list(generated_images))}
        if role in real_roles:
            out[role]["real"] = embedder.embed_images(list(real_images))
    return out


def _prompt_problem(generated: Sequence[GeneratedImage]) -> str | None:
    """Why CLIP-T cannot be computed (images without a prompt), or None."""
    unprompted = [g.path.name for g in generated if not g.prompt]
    if not unprompted:
        return None
    return (
        f"{len(unprompted)} generated image(s) have no prompt (first: {unprompted[0]}); give a manifest.jsonl or a 'prompt' PNG text field"
    )


def score_embeddings(
    names: Sequence[str],
    embeddings: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    texts: Mapping[str, torch.Tensor],
    used: Mapping[str, ImageEmbedder],
    kid_subsets: int,
) -> dict[str, dict]:
    """metric -> its values plus the backbone, preprocessing and aggregation behind them."""
    results = {}
    for name in names:
        spec = METRICS[name]
        emb = {subject: by_role[spec.role] for subject, by_role in embeddings.items()}
        if name == "clip_t":
            values = score_clip_t(emb, texts, getattr(used["clip"], "agreement", rowwise_cosine))
        elif name == "vendi":
            values = score_vendi(emb)
        elif name == "kid":
            values = score_kid(emb, kid_subsets)
        elif name == "fid":
            values = score_fid(emb)
        else:
            values = score_pair_cosine(emb)
        results[name] = {
            **values,
            "backbone": used[spec.role].name,
            "preprocessing": used[spec.role].preprocessing,
            "aggregation": spec.aggregation,
            "higher_is_better": spec.higher_is_better,
        }
    return results


def evaluate(
    real: RealSource,
    generated: PathLike,
    metrics: Union[str, Iterable[str]] = DEFAULT_METRICS,
    embedders: Embedders = "default",
    placeholder_tokens: Union[str, Sequence[str], None] = None,
    kid_subsets: int = 100,
) -> dict:
    """Compute `metrics` for `generated` (a folder with manifest.jsonl or PNG prompts) against `real`.

    `real` is a folder of images (one subject), a folder of subject folders, or a mapping subject ->
    image paths. Placeholder tokens (the manifest's adapters[].token, plus `placeholder_tokens`) are
    removed from prompts before CLIP-T. Returns a JSON-ready report: values with their backbone,
    preprocessing and aggregation, image counts per subject, and the metrics skipped with the reason.
    """
    names = parse_metrics(metrics)
    extra_tokens = [placeholder_tokens] if isinstance(placeholder_tokens, str) else list(placeholder_tokens or [])
    real_subjects = read_real(real)
    generated_images, metadata_source = read_generated(generated)
    by_subject = group_by_subject(real_subjects, generated_images)

    skipped = {}
    if "clip_t" in names and (problem := _prompt_problem(generated_images)):
        skipped["clip_t"] = problem
        names.remove("clip_t")
    used = resolve_embedders(embedders, {METRICS[name].role for name in names})
    n_real = sum(len(real_subjects[s]) for s in by_subject)
    if "fid" in names:
        check_frechet_sizes(n_real, len(generated_images), used["inception"].dim)
    if "kid" in names and min(n_real, len(generated_images)) < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated images, got {n_real} and {len(generated_images)}")

    real_roles = {METRICS[name].role for name in names if METRICS[name].needs_real}
    embeddings: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # subject -> role -> real/generated
    texts: dict[str, torch.Tensor] = {}  # subject -> (n_generated, d) prompt embeddings
    for subject, images in by_subject.items():
        logger.info("subject %s: %d real, %d generated images", subject, len(real_subjects[subject]), len(images))
        real_images = [open_image(p) for p in real_subjects[subject]] if real_roles else []
        embeddings[subject] = embed_images(real_images, [open_image(g.path) for g in images], used, real_roles)
        if "clip_t" in names:
            prompts = [strip_placeholders(g.prompt or "", (*g.tokens, *extra_tokens)) for g in images]
            texts[subject] = used["clip"].embed_texts(prompts)

    results = score_embeddings(names, embeddings, texts, used, kid_subsets)
    return {
        "format": REPORT_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {
            "real": f"mapping of {len(real)} subject(s)" if isinstance(real, Mapping) else str(real),
            "generated": str(generated),
            "metadata_from": metadata_source,
            "placeholder_tokens": sorted({t for g in generated_images for t in g.tokens} | set(extra_tokens)),
        },
        "run": {
            "methods": sorted({m for g in generated_images for m in g.methods}),
            "base_models": sorted({g.base_model for g in generated_images if g.base_model}),
        },
        "aggregation": "per subject first, then the mean over subjects ('value'); 'flat' pools all subjects",
        "subjects": {s: {"real_images": len(real_subjects[s]), "generated_images": len(images)} for s, images in by_subject.items()},
        "subjects_without_generated_images": sorted(set(real_subjects) - set(by_subject)),
        "metrics": results,
        "skipped": skipped,
    }
