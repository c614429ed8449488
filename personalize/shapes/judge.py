"""The shapes judge: a small CNN that names the shape, object colour, pattern and background of a
32 px shapes-world image, and whose penultimate features serve as an image embedder.

Architecture: four 3x3 conv blocks (32, 64, 128, 128 channels; batch norm, ReLU, 2x2 max pool)
from 32x32 down to 2x2, global average pool, a 128-d feature layer, then one linear head per
attribute. Trained on the whole world, the personalization concepts included (heart, crescent,
two-tone), with blur, noise and colour jitter so that it reads generated images too:
`python -m personalize.shapes.train_judge`. Weights: `data/judge.safetensors` (fp16), with the
attribute vocabularies in its metadata.

Uses: attribute accuracy of generated images (`predict`), concept recognition (`recognises`), and
embeddings (`embed`, L2-normalised features) for the metrics package's `shapes` embedder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import UserError
from . import world as W

WEIGHTS = Path(__file__).parent / "data" / "judge.safetensors"
FEATURES = 128
ATTRIBUTES = {
    "shape": W.ALL_SHAPES,
    "colour": W.COLOUR_NAMES,
    "pattern": W.ALL_PATTERNS,
    "background": W.BACKGROUND_NAMES,
}


class ShapesJudge(nn.Module):
    def __init__(self, vocab: dict[str, Sequence[str]] = ATTRIBUTES) -> None:
        super().__init__()
        self.vocab = {k: tuple(v) for k, v in vocab.items()}
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 64, 128, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(channels, FEATURES), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(values)) for name, values in self.vocab.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (n, 3, 32, 32) in [-1, 1] -> features (n, 128), logits per attribute (n, classes)."""
        h = self.body(x).mean(dim=(2, 3))  # (n, 128)
        f = self.features(h)  # (n, 128)
        return f, {name: head(f) for name, head in self.heads.items()}


def to_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (any size) -> (n, 3, 32, 32) float in [-1, 1]."""
    arrays = [np.asarray(img.convert("RGB").resize((W.RESOLUTION, W.RESOLUTION), Image.BILINEAR)) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@lru_cache(maxsize=1)
def load_judge() -> ShapesJudge:
    """The shipped judge, on the CPU, in eval mode."""
    from safetensors import safe_open

    if not WEIGHTS.is_file():
        raise UserError(f"the shapes judge is missing ({WEIGHTS}); rebuild it with `python -m personalize.shapes.train_judge`")
    with safe_open(str(WEIGHTS), framework="pt") as handle:
        vocab = json.loads(handle.metadata()["vocab"])
        state = {k: handle.get_tensor(k).float() for k in handle.keys()}
    judge = ShapesJudge(vocab)
    judge.load_state_dict(state)
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def predict(images: Sequence[Image.Image], batch_size: int = 256) -> list[dict[str, str]]:
    """The judge's reading of each image: {"shape": ..., "colour": ..., "pattern": ..., "background": ...}."""
    judge = load_judge()
    out: list[dict[str, str]] = []
    for start in range(0, len(images), batch_size):
        _, logits = judge(to_batch(images[start : start + batch_size]))
        picks = {name: scores.argmax(dim=1).tolist() for name, scores in logits.items()}
        for i in range(len(next(iter(picks.values())))):
            out.append({name: judge.vocab[name][idx[i]] for name, idx in picks.items()})
    return out


@torch.no_grad()
def embed(images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised penultimate features, (n, 128)."""
    judge = load_judge()
    feats = [judge(to_batch(images[s : s + batch_size]))[0] for s in range(0, len(images), batch_size)]
    return nn.functional.normalize(torch.cat(feats), dim=1)


def recognises(reading: dict[str, str], concept: W.Concept) -> bool:
    """True when the judge sees the concept's shape, colour and pattern (background is free)."""
    return (reading["shape"], reading["colour"], reading["pattern"]) == (concept.shape, concept.colour, concept.pattern)


def prompt_attributes(prompt: str, vocab: dict[str, Sequence[str]] = ATTRIBUTES) -> dict[str, str]:
    """The attribute values a prompt names ("a red star on a teal background" -> shape star, colour
    red, background teal). A colour word followed by "background" is the background."""
    words = prompt.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    for i, word in enumerate(words):
        is_background = i + 1 < len(words) and words[i + 1] == "background"
        if is_background and word in vocab["background"]:
            found["background"] = word
        elif word in vocab["colour"] and "colour" not in found:
            found["colour"] = word
        elif word in vocab["shape"]:
            found["shape"] = word
        elif word in W.PATTERN_WORDS.values():
            found["pattern"] = next(k for k, v in W.PATTERN_WORDS.items() if v == word)
    return found


def prompt_agreement(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """Per image: the share of its prompt's attributes that the judge sees (the CLIP-T analogue);
    nan for a prompt that names no attribute."""
    readings = predict(images)
    scores = []
    for reading, text in zip(readings, prompts):
        asked = prompt_attributes(text)
        scores.append(sum(reading[k] == v for k, v in asked.items()) / len(asked) if asked else float("nan"))
    return scores
