"""Personalization metrics: DINO, CLIP-I, CLIP-T, Vendi, KID, FID, with reports, plots and the eval command."""

from metrics.dreambench import dreambench_prompts, load_dreambench
from metrics.embedders import ImageEmbedder, ImageTextEmbedder, default_embedders, load_embedder, tiny_embedders
from metrics.evaluate import evaluate
from metrics.frechet import frechet_distance
from metrics.kid import KernelDistance, kernel_inception_distance
from metrics.report import markdown_report, markdown_table, write_comparison, write_report
from metrics.similarity import mean_pairwise_cosine, pairwise_cosine, rowwise_cosine
from metrics.vendi import vendi_score

__all__ = [
    "ImageEmbedder",
    "ImageTextEmbedder",
    "KernelDistance",
    "default_embedders",
    "dreambench_prompts",
    "evaluate",
    "frechet_distance",
    "kernel_inception_distance",
    "load_dreambench",
    "load_embedder",
    "markdown_report",
    "markdown_table",
    "mean_pairwise_cosine",
    "pairwise_cosine",
    "rowwise_cosine",
    "tiny_embedders",
    "vendi_score",
    "write_comparison",
    "write_report",
]
