"""`personalize bench --quality`: does each adapter method actually learn a subject? Measured on the
built-in `shapes` model with its judge, offline, on a CPU.

Base quality: prompts that combine a shape with the one colour pretraining never drew on it
(`world.HELD_OUT_PAIRS`), random pattern and background; the share of images in which the judge
sees each requested attribute.

Personalization: for each concept of `world.CONCEPTS` (a shape or pattern pretraining never drew),
4 instance images on `INSTANCE_BACKGROUNDS` (with `captions`, each captioned with its background);
every method trains with its default options (plus `recipe.QUALITY_VARIANTS`, or the
`method:key=value` configurations asked for) for the same number of steps, then renders
`a {token} shape on a <colour> background` for each of `UNSEEN_BACKGROUNDS`. Per method (mean over concepts):
- fidelity: share of images in which the judge sees the concept (shape, colour and pattern);
- cosine: mean cosine of judge features between generated and instance images;
- alignment: share of images whose background is the prompted one;
- diversity: Vendi score of the judge features (a callable wired by the CLI from `metrics`);
plus trainable parameters, training time (the step loop), whole-run time and the time from the call
to the first step (the slowest concept's: class images are generated then, with prior 'images'); the
same for the base model (no adapter) and for the instance images themselves.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..adapters import method_names
from ..data import mask_file
from ..generate import generate
from ..shapes import judge as J
from ..shapes import recipe
from ..shapes import world as W
from .config import MethodSpec, parse_method_spec

log = logging.getLogger(__name__)

TOKEN = recipe.TOKEN
INSTANCES, BASE = "instance images", "base model (no adapter)"  # the two reference rows of the table
Diversity = Callable[[torch.Tensor], float]


@dataclass
class QualityConfig:
    work_dir: str = "outputs/quality"
    methods: list[str] | None = None  # `lora`, `lora:preset=attention_convs`, ...; None: every method + recipe.QUALITY_VARIANTS
    concepts: list[str] | None = None  # None: every concept of the world
    steps: int = recipe.STEPS
    lr_factor: float = recipe.LR_FACTOR  # times each method's paper learning rate
    images_per_background: int = 4
    sample_steps: int = 25
    guidance: float = recipe.GUIDANCE
    seed: int = 0
    base_images: int = 64  # held-out-pair images for the base-quality table
    captions: bool = False  # train on captions naming each instance image's background (written next to it)
    masks: bool = False  # write each instance image's object mask next to it (<image>.mask.png): masked loss
    mask_background_weight: float = 0.1  # TrainConfig's default: the loss weight outside the masks
    instance_background: str | None = None  # all instance images on this one background (None: INSTANCE_BACKGROUNDS in turn)
    prior: str = "none"  # prior preservation mode (the recipe trains without)
    train_text_encoder: bool = False  # also adapt the text encoder (issue 17)
    token_vectors: int = 0  # pivotal tuning: learned token vectors (0 = off)


@dataclass
class Scores:
    fidelity: float
    cosine: float
    alignment: float
    diversity: float
    images: int

    @classmethod
    def mean(cls, rows: Sequence[Scores]) -> Scores:
        return cls(
            *(_mean_of_known([getattr(r, f) for r in rows]) for f in ("fidelity", "cosine", "alignment", "diversity")),
            images=sum(r.images for r in rows),
        )


def _mean_of_known(values: Sequence[float]) -> float:
    """Mean over the finite values; NaN when there are none (the instance images have no alignment)."""
    known = [v for v in values if np.isfinite(v)]
    return float(np.mean(known)) if known else float("nan")


@dataclass
class MethodRow:
    label: str
    scores: Scores
    trainable: int = 0
    train_s: float = 0.0
    per_concept: dict[str, dict[str, float]] = field(default_factory=dict)


def prompts_for(concept: W.Concept) -> list[tuple[str, str]]:
    """(prompt, background) pairs: the concept prompted on every unseen background."""
    return [(f"a {TOKEN} {W.CLASS_NOUN} on a {bg} background", bg) for bg in W.UNSEEN_BACKGROUNDS]


def score(
    images: Sequence[Image.Image],
    backgrounds: Sequence[str | None],
    concept: W.Concept,
    instances: Sequence[Image.Image],
    diversity: Diversity,
) -> Scores:
    readings = J.predict(images)
    feats, ref = J.embed(images), J.embed(instances)  # (n, 128), (m, 128), unit rows
    same_set = images is instances
    cos = feats @ ref.T
    if same_set:
        cos = cos[~torch.eye(len(images), dtype=torch.bool)]
    aligned = [r["background"] == bg for r, bg in zip(readings, backgrounds) if bg is not None]
    return Scores(
        fidelity=float(np.mean([J.recognises(r, concept) for r in readings])),
        cosine=float(cos.mean()),
        alignment=float(np.mean(aligned)) if aligned else float("nan"),
        diversity=float(diversity(feats)),
        images=len(images),
    )


def write_instances(concept: W.Concept, folder: Path, config: QualityConfig | None = None) -> list[Path]:
    """The concept's instance images, each with a caption naming its background, as a user would write
    it (`{token}` for the subject; training reads it only with `captions`), and with `config.masks` the
    object's mask (training reads `<image>.mask.png` by default)."""
    config = config or QualityConfig()
    backgrounds = (config.instance_background,) if config.instance_background else W.INSTANCE_BACKGROUNDS
    shutil.rmtree(folder, ignore_errors=True)  # no masks or captions of an earlier run with other settings
    paths = W.write_instance_images(concept, folder, backgrounds=backgrounds, mask_path=mask_file if config.masks else None)
    for i, path in enumerate(paths):
        background = backgrounds[i % len(backgrounds)]
        path.with_suffix(".txt").write_text(f"a {{token}} {{class_noun}} on a {background} background\n", encoding="utf-8")
    return paths


def render_concept(pipe, concept: W.Concept, adapter: str | None, config: QualityConfig) -> tuple[list[Image.Image], list[str]]:
    from ..generate import AdapterSpec

    images, backgrounds = [], []
    for text, bg in prompts_for(concept):
        out = generate(
            pipe,
            text,
            adapters=[AdapterSpec(adapter)] if adapter else (),
            num_images=config.images_per_background,
            seed=config.seed,
            steps=config.sample_steps,
            guidance=config.guidance,
        )
        images += [g.image for g in out]
        backgrounds += [bg] * len(out)
    return images, backgrounds


def train_concept(spec: MethodSpec, instance_dir: Path, out: Path, config: QualityConfig):
    """(TrainResult, seconds from the call to the first step) of one method configuration on one concept."""
    from ..train import TrainConfig, train
    from ..training.callbacks import TrainCallback

    class FirstStep(TrainCallback):
        def __init__(self) -> None:
            self.began, self.seconds = time.perf_counter(), 0.0

        def on_start(self, *_: Any) -> None:
            self.seconds = time.perf_counter() - self.began

    settings = recipe.train_settings(spec.name, config.lr_factor) | {
        "method_options": dict(spec.options),
        "steps": config.steps,
        "prior": config.prior,
        "mask_background_weight": config.mask_background_weight,
        "train_text_encoder": config.train_text_encoder,
        "token_vectors": config.token_vectors,
    }
    first = FirstStep()
    result = train(
        TrainConfig(
            instance_images=str(instance_dir),
            output_dir=str(out),
            validation_every=0,
            checkpoint_every=0,
            seed=config.seed,
            captions=config.captions,
            overwrite=True,
            cpu=not torch.cuda.is_available(),
            **settings,
        ),
        [first],
    )
    return result, first.seconds


def base_quality(pipe, config: QualityConfig) -> dict[str, Any]:
    """Share of images in which the judge sees each requested attribute, on held-out (shape, colour) pairs."""
    rng = np.random.default_rng(config.seed)
    pairs = sorted(W.HELD_OUT_PAIRS)
    asked, images = [], []
    for i in range(config.base_images):
        shape, colour = pairs[i % len(pairs)]
        pattern = W.PATTERNS[rng.integers(len(W.PATTERNS))]
        background = W.BACKGROUND_NAMES[rng.integers(len(W.BACKGROUND_NAMES))]
        text = W.prompt(shape, colour, pattern, background)
        images += [
            g.image for g in generate(pipe, text, num_images=1, seed=config.seed + i, steps=config.sample_steps, guidance=config.guidance)
        ]
        asked.append({"shape": shape, "colour": colour, "pattern": pattern, "background": background})
    readings = J.predict(images)
    per_attribute = {k: float(np.mean([r[k] == a[k] for r, a in zip(readings, asked)])) for k in asked[0]}
    return {
        "images": len(images),
        "per_attribute": per_attribute,
        "all_four": float(np.mean([r == a for r, a in zip(readings, asked)])),
        "_images": images,
    }


def run_quality(config: QualityConfig, diversity: Diversity, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from ..io import adapter_info
    from ..models import load_pipeline

    began = time.perf_counter()
    work = Path(config.work_dir)
    concepts = [W.concept_by_name(n) for n in config.concepts] if config.concepts else list(W.CONCEPTS)
    specs = [parse_method_spec(text) for text in (config.methods or [*method_names(), *recipe.QUALITY_VARIANTS])]
    pipe = load_pipeline("shapes", device="cuda" if torch.cuda.is_available() else "cpu")
    base, base_images = None, []
    if config.base_images:
        progress("base quality")
        base = base_quality(pipe, config)
        base_images = base.pop("_images")

    instances = {c.name: [Image.open(p).convert("RGB") for p in write_instances(c, work / "instances" / c.name, config)] for c in concepts}
    rows: dict[str, list[tuple[W.Concept, Scores]]] = {INSTANCES: [], BASE: []}
    extra: dict[str, dict[str, float]] = {}
    gallery: dict[str, dict[str, list[Image.Image]]] = {c.name: {"instances": instances[c.name]} for c in concepts}
    for concept in concepts:
        inst = instances[concept.name]
        rows[INSTANCES].append((concept, score(inst, [None] * len(inst), concept, inst, diversity)))
        progress(f"base model: {concept.name}")
        images, bgs = render_concept(pipe, concept, None, config)
        rows[BASE].append((concept, score(images, bgs, concept, inst, diversity)))
        gallery[concept.name][BASE] = images[:: config.images_per_background]
    for spec in specs:
        label = spec.label
        rows[label] = []
        extra[label] = {"trainable": 0, "train_s": 0.0}
        for concept in concepts:
            progress(f"{label}: {concept.name}")
            run_dir = work / "runs" / re.sub(r"[:,=]", "-", label) / concept.name  # lora:preset=x -> runs/lora-preset-x
            result, first_step_s = train_concept(spec, work / "instances" / concept.name, run_dir, config)
            images, bgs = render_concept(pipe, concept, result.adapter_path, config)
            rows[label].append((concept, score(images, bgs, concept, instances[concept.name], diversity)))
            gallery[concept.name][label] = images[:: config.images_per_background]
            extra[label]["trainable"] = result.num_trainable
            extra[label]["train_s"] += result.train_time / len(concepts)
            extra[label]["wall_s"] = extra[label].get("wall_s", 0.0) + result.wall_time / len(concepts)
            # the slowest start: the first concept's, when class images (prior 'images') are generated into an empty cache
            extra[label]["first_step_s"] = max(extra[label].get("first_step_s", 0.0), first_step_s)
            extra[label]["file_bytes"] = adapter_info(result.adapter_path)["file_size"]
    table = []
    for label, scored in rows.items():
        row = MethodRow(label, Scores.mean([s for _, s in scored]), per_concept={c.name: asdict(s) for c, s in scored})
        if label in extra:
            row.trainable, row.train_s = int(extra[label]["trainable"]), float(extra[label]["train_s"])
        times = {k: float(extra.get(label, {}).get(k, 0.0)) for k in ("wall_s", "first_step_s")}
        table.append(asdict(row) | {"file_bytes": int(extra.get(label, {}).get("file_bytes", 0))} | times)
    grid = work / "grid.png"
    gallery_grid(gallery, list(rows)[1:]).save(grid)
    if base_images:
        base_grid(base_images).save(work / "base-grid.png")
    return {
        "settings": asdict(config)
        | {
            "concepts": [c.name for c in concepts],
            "methods": [spec.label for spec in specs],
            "token": TOKEN,
            "prompts": [p for p, _ in prompts_for(concepts[0])],
        },
        "base_quality": base,
        "rows": table,
        "grid": str(grid),
        "total_s": time.perf_counter() - began,
    }


def _upscaled(image: Image.Image, size: int = 64) -> Image.Image:
    return image.convert("RGB").resize((size, size), Image.NEAREST)


def gallery_grid(gallery: dict[str, dict[str, list[Image.Image]]], columns: list[str], cell: int = 64) -> Image.Image:
    """One row per concept: its instance images, then per column (base, each method) one image per
    unseen background, with the column names on top."""
    n_inst = max(len(g["instances"]) for g in gallery.values())
    n_bg = len(W.UNSEEN_BACKGROUNDS)
    header = 14
    blocks = [("instances", n_inst)] + [(c, n_bg) for c in columns]
    width = sum(n for _, n in blocks) * cell + 4 * len(blocks)
    canvas = Image.new("RGB", (width, header + cell * len(gallery)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, n in blocks:
        draw.text((x + 2, 1), name[: (n * cell) // 6], fill="black")
        for row, concept in enumerate(gallery.values()):
            for i, image in enumerate(concept.get(name, [])[:n]):
                canvas.paste(_upscaled(image, cell), (x + i * cell, header + row * cell))
        x += n * cell + 4
    return canvas


def base_grid(images: Sequence[Image.Image], cols: int = 16, cell: int = 48) -> Image.Image:
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, image in enumerate(images):
        canvas.paste(_upscaled(image, cell), ((i % cols) * cell, (i // cols) * cell))
    return canvas


def markdown(record: dict[str, Any]) -> str:
    """The base-quality and personalization tables."""
    base, lines = record["base_quality"], []
    if base:
        lines += [
            f"Base quality on held-out (shape, colour) pairs ({base['images']} images): "
            "share of images in which the judge sees each requested attribute.",
            "",
            "| shape | colour | pattern | background | all four |",
            "|---:|---:|---:|---:|---:|",
            "| "
            + " | ".join(f"{base['per_attribute'][k]:.2f}" for k in ("shape", "colour", "pattern", "background"))
            + f" | {base['all_four']:.2f} |",
            "",
        ]
    lines += [
        "| Method | Fidelity (judge) | Cosine to instances | Alignment (background) | Diversity (Vendi) "
        "| Trainable | File | Train time (s) | Whole run (s) | First step after (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["rows"]:
        s = row["scores"]
        align = "-" if np.isnan(s["alignment"]) else f"{s['alignment']:.2f}"
        size = f"{row['file_bytes'] / 1024:.1f} KB" if row["file_bytes"] else "-"
        trainable = f"{row['trainable']:,}" if row["trainable"] else "-"
        train_s = f"{row['train_s']:.1f}" if row["train_s"] else "-"
        scores = f"{s['fidelity']:.2f} | {s['cosine']:.2f} | {align} | {s['diversity']:.2f}"
        wall = f"{row['wall_s']:.1f}" if row.get("wall_s") else "-"
        first = f"{row['first_step_s']:.1f}" if row.get("first_step_s") else "-"
        lines.append(f"| {row['label']} | {scores} | {trainable} | {size} | {train_s} | {wall} | {first} |")
    return "\n".join(lines)
