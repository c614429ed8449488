"""Tiny random embedders built from small configs: offline, deterministic (seed 0), seconds on CPU.

They exercise the same code paths as the real backbones (tests, smoke runs with `--embedders tiny`);
their numbers mean nothing.
"""

from __future__ import annotations

from functools import cache
from typing import Callable, TypeVar

import torch

from metrics.embedders.base import ImageEmbedder
from metrics.embedders.clip import ClipEmbedder, ModelTransformTokenizer
from metrics.embedders.inception import InceptionEmbedder
from metrics.embedders.vit import ModelAndProcessor, VitEmbedder

SEED = 0
IMAGE_SIZE = 32
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

T = TypeVar("T")


def _seeded(build: Callable[[], T]) -> Callable[[], T]:
    """Wrap a model builder so its random weights come from SEED without touching the global RNG."""

    def seeded_build() -> T:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return build()

    return seeded_build


def _vit_processor() -> Callable:
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def _build_dino() -> ModelAndProcessor:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    return ViTModel(config, add_pooling_layer=False), _vit_processor()


def _build_dinov2() -> ModelAndProcessor:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    processor = BitImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return Dinov2Model(config), processor


def _build_clip() -> ModelTransformTokenizer:
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(
        "ViT-B-32",
        pretrained=None,
        embed_dim=16,
        vision_cfg={"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    return model, transform, open_clip.get_tokenizer("ViT-B-32")


class TinyInception(torch.nn.Module):
    """Two strided convolutions and global pooling: uint8 (n, 3, S, S) -> (n, 16), like Inception's interface."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images.float() / 127.5 - 1.0)  # (n, 3, S, S) uint8 -> (n, 16)


@cache
def tiny_dino() -> VitEmbedder:
    return VitEmbedder("tiny-random ViT (DINO stand-in, seed 0)", _seeded(_build_dino), pooled=False)


@cache
def tiny_dinov2() -> VitEmbedder:
    return VitEmbedder("tiny-random DINOv2 (seed 0)", _seeded(_build_dinov2), pooled=True)


@cache
def tiny_clip() -> ClipEmbedder:
    return ClipEmbedder("tiny-random open_clip ViT (seed 0)", _seeded(_build_clip))


@cache
def tiny_inception() -> InceptionEmbedder:
    return InceptionEmbedder("tiny-random conv net (Inception stand-in, seed 0)", _seeded(TinyInception), dim=16, image_size=IMAGE_SIZE)


def tiny_embedders() -> dict[str, ImageEmbedder]:
    """One tiny embedder per role ("dino", "dinov2", "clip", "inception"); models load on first use."""
    return {"dino": tiny_dino(), "dinov2": tiny_dinov2(), "clip": tiny_clip(), "inception": tiny_inception()}
