"""`personalize bench --quality`: does each adapter method actually learn a subject? Measured on the
built-in `shapes` model with its judge, offline, on a CPU.

Base quality: prompts that combine a shape with the one colour pretraining never drew on it
(`world.HELD_OUT_PAIRS`), random pattern and background; the share of images in which the judge
sees each requested attribute.

Personalization, on two tiers of subjects (`world.TIERS`), each its own table:
- the subject tier (`world.SUBJECTS`, one split: tuning or evaluation): subjects made of parts
  pretraining drew, DreamBooth's real case. Its **ceiling** row is the base model prompted with the
  subject's own words (`a red striped star on a teal background`) on the same backgrounds and seeds;
- the new-outline tier (`world.CONCEPTS`): a shape or pattern pretraining never drew.
Each subject has 4 instance images on `INSTANCE_BACKGROUNDS` (each with a caption naming its
background, read with `captions`); every method trains at its setting on `shapes`
(`recipe.setting`: the tuned one where `recipe.TUNED` has it, else the recipe's; `method:key=value`
specs add options) and, with `paper_defaults`, also at its paper default (`recipe.PAPER`); then
renders `a {token} shape on a <colour> background` for each of `UNSEEN_BACKGROUNDS`. Per method
(mean over subjects):
- fidelity: share of images in which the judge sees the subject (shape, colour and pattern);
- share of ceiling (subject tier): per subject, fidelity / the ceiling row's fidelity, then averaged
  (subjects with a ceiling of 0 left out);
- cosine: mean cosine of judge features between generated and instance images;
- alignment: share of images whose background is the prompted one;
- diversity: Vendi score of the judge features (a callable wired by the CLI from `metrics`);
plus trainable parameters, training time (the step loop), whole-run time and the time from the call
to the first step (the slowest subject's: class images are generated then, with prior 'images'); the
same for the base model (no adapter) and for the instance images themselves.
"""

from __future__ import annotations

import dataclasses
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
from ..errors import UserError
from ..generate import generate
from ..shapes import judge as J
from ..shapes import recipe
from ..shapes import world as W
from .config import MethodSpec, parse_method_spec

log = logging.getLogger(__name__)

TOKEN = recipe.TOKEN
INSTANCES, BASE, CEILING = "instance images", "base model (no adapter)", "explicit prompt (ceiling)"  # the reference rows
ALL_TIERS = "all"
TIER_CHOICES = (*W.TIERS, ALL_TIERS)
PAPER_LABEL = " (paper default)"
Diversity = Callable[[torch.Tensor], float]


@dataclass
class QualityConfig:
    work_dir: str = "outputs/quality"
    methods: list[str] | None = None  # `lora`, `lora:rank=8`, ...; None: every method
    tier: str = ALL_TIERS  # subjects | outlines | all
    split: str = W.EVALUATION  # the subject tier's split (the new-outline tier has none)
    concepts: list[str] | None = None  # names of either tier (overrides tier and split); None: the tier's and split's
    paper_defaults: bool = False  # also measure each method at its paper default (recipe.PAPER)
    steps: int | None = None  # None: each method's setting's
    lr_factor: float | None = None  # times each method's paper learning rate; None: each method's setting's
    images_per_background: int = 4
    sample_steps: int = 25
    guidance: float = recipe.GUIDANCE
    seed: int = 0
    base_images: int = 64  # held-out-pair images for the base-quality table
    # TrainConfig fields set for every row (None: each method's setting's, the recipe's unless tuned otherwise)
    captions: bool | None = None  # train on captions naming each instance image's background (written next to it)
    mask_background_weight: float | None = None  # the loss weight outside the masks
    prior: str | None = None  # prior preservation mode (the recipe trains without)
    train_text_encoder: bool | None = None  # also adapt the text encoder (issue 17)
    token_vectors: int | None = None  # pivotal tuning: learned token vectors (0 = off)
    masks: bool = False  # write each instance image's object mask next to it (<image>.mask.png): masked loss
    instance_background: str | None = None  # all instance images on this one background (None: INSTANCE_BACKGROUNDS in turn)

    def validate(self) -> None:
        if self.tier not in TIER_CHOICES:
            raise UserError(f"unknown tier '{self.tier}'; accepted: {', '.join(TIER_CHOICES)}")
        if self.split not in W.SPLITS:
            raise UserError(f"unknown split '{self.split}'; accepted: {', '.join(W.SPLITS)}")
        known = [c.name for c in W.SUBJECTS + W.CONCEPTS]
        for name in self.concepts or []:
            if name not in known:
                raise UserError(f"unknown concept '{name}'; accepted: {', '.join(known)}")

    def overrides(self) -> dict[str, Any]:
        """The TrainConfig fields this config sets for every row."""
        names = ("captions", "mask_background_weight", "prior", "train_text_encoder", "token_vectors")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


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


def share_of_ceiling(fidelity: float, ceiling: float) -> float:
    """`fidelity` as a share of the ceiling's; NaN where the ceiling is 0 (nothing to share)."""
    return fidelity / ceiling if ceiling > 0 else float("nan")


@dataclass(frozen=True)
class Run:
    """One trained row: a method configuration (`group`, its `--methods` spec) at one setting."""

    label: str
    method: str
    group: str
    kind: str  # tuned | recipe | paper | sweep
    setting: recipe.Tuned
    point: dict[str, Any] = field(default_factory=dict)  # a sweep's values of this row


def with_config(setting: recipe.Tuned, options: dict[str, Any], config: QualityConfig) -> recipe.Tuned:
    """`setting` with the spec's method options and the config's settings for every row on top."""
    return dataclasses.replace(
        setting,
        options=setting.options | options,
        overrides=setting.overrides | config.overrides(),
        steps=setting.steps if config.steps is None else config.steps,
        lr_factor=setting.lr_factor if config.lr_factor is None else config.lr_factor,
    )


def quality_runs(specs: Sequence[MethodSpec], config: QualityConfig) -> list[Run]:
    """Each spec at its method's setting (tuned or the recipe's) and, with `paper_defaults`, at its paper default."""
    runs = []
    for spec in specs:
        kind = "tuned" if spec.name in recipe.TUNED else "recipe"
        runs.append(Run(spec.label, spec.name, spec.label, kind, with_config(recipe.setting(spec.name), spec.options, config)))
        if config.paper_defaults:
            paper = with_config(recipe.PAPER, spec.options, config)
            runs.append(Run(spec.label + PAPER_LABEL, spec.name, spec.label, "paper", paper))
    return runs


def select_concepts(config: QualityConfig) -> dict[str, list[W.Concept]]:
    """Tier -> its concepts to measure: `concepts` by name, else the tier's (the subject tier's of `split`)."""
    if config.concepts:
        chosen = [W.concept_by_name(name) for name in config.concepts]
    else:
        subjects = W.subjects(config.split) if config.tier in (W.SUBJECT_TIER, ALL_TIERS) else []
        chosen = subjects + (list(W.CONCEPTS) if config.tier in (W.OUTLINES, ALL_TIERS) else [])
    return {tier: [c for c in chosen if c.tier == tier] for tier in W.TIERS if any(c.tier == tier for c in chosen)}


def prompts_for(concept: W.Concept) -> list[tuple[str, str]]:
    """(prompt, background) pairs: the concept prompted on every unseen background."""
    return [(f"a {TOKEN} {W.CLASS_NOUN} on a {bg} background", bg) for bg in W.UNSEEN_BACKGROUNDS]


def explicit_prompts(concept: W.Concept) -> list[tuple[str, str]]:
    """(prompt, background) pairs of the ceiling: the concept in its own words on every unseen background."""
    return [(W.prompt(concept.shape, concept.colour, concept.pattern, bg), bg) for bg in W.UNSEEN_BACKGROUNDS]


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


def render_prompts(
    pipe, prompts: Sequence[tuple[str, str]], adapter: str | None, config: QualityConfig
) -> tuple[list[Image.Image], list[str]]:
    """`images_per_background` images of each (prompt, background), every prompt from the same seeds."""
    from ..generate import AdapterSpec

    images, backgrounds = [], []
    for text, bg in prompts:
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


def render_concept(pipe, concept: W.Concept, adapter: str | None, config: QualityConfig) -> tuple[list[Image.Image], list[str]]:
    return render_prompts(pipe, prompts_for(concept), adapter, config)


def train_concept(run: Run, instance_dir: Path, out: Path, config: QualityConfig):
    """(TrainResult, seconds from the call to the first step) of one run on one concept."""
    from ..train import TrainConfig, train
    from ..training.callbacks import TrainCallback

    class FirstStep(TrainCallback):
        def __init__(self) -> None:
            self.began, self.seconds = time.perf_counter(), 0.0

        def on_start(self, *_: Any) -> None:
            self.seconds = time.perf_counter() - self.began

    fixed = dict(
        instance_images=str(instance_dir),
        output_dir=str(out),
        validation_every=0,
        checkpoint_every=0,
        seed=config.seed,
        overwrite=True,
        cpu=not torch.cuda.is_available(),
    )
    first = FirstStep()
    result = train(TrainConfig(**(fixed | run.setting.train_settings(run.method))), [first])
    return result, first.seconds


def train_config_of(run: Run, config: QualityConfig):
    """The run's TrainConfig, checked (every value, before any training), on placeholder paths."""
    from ..training.config import make_config, resolve

    fixed = dict(instance_images="instances", output_dir="run", validation_every=0, checkpoint_every=0, seed=config.seed)
    return resolve(make_config(fixed | run.setting.train_settings(run.method), source=f"the row '{run.label}'"))


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


def table_row(label: str, scored: Sequence[tuple[W.Concept, Scores]], ceilings: dict[str, float] | None, **extra: Any) -> dict[str, Any]:
    """One row of a tier's table: mean scores, per-concept scores and, with `ceilings` (concept -> the
    ceiling's fidelity), each concept's share of its ceiling and their mean."""
    per_concept = {c.name: asdict(s) for c, s in scored}
    row = {"label": label, "scores": asdict(Scores.mean([s for _, s in scored]))}
    if ceilings is not None:
        for c, s in scored:
            per_concept[c.name]["share_of_ceiling"] = share_of_ceiling(s.fidelity, ceilings[c.name])
        row["share_of_ceiling"] = _mean_of_known([p["share_of_ceiling"] for p in per_concept.values()])
    defaults = dict(method="", group="", kind="reference", setting=None, trainable=0, train_s=0.0, wall_s=0.0, first_step_s=0.0)
    return row | defaults | extra | {"per_concept": per_concept}


def measure_tier(
    pipe,
    tier: str,
    concepts: Sequence[W.Concept],
    runs: Sequence[Run],
    config: QualityConfig,
    diversity: Diversity,
    progress: Callable[[str], None],
    grid_name: str,
) -> dict[str, Any]:
    """One tier's table: the reference rows (instance images, base model and, on the subject tier, the
    explicit-prompt ceiling), then each run trained on every concept; and its grid image."""
    from ..io import adapter_info

    work = Path(config.work_dir)
    instances = {c.name: [Image.open(p).convert("RGB") for p in write_instances(c, work / "instances" / c.name, config)] for c in concepts}
    gallery: dict[str, dict[str, list[Image.Image]]] = {c.name: {"instances": instances[c.name]} for c in concepts}
    references: dict[str, list[tuple[W.Concept, Scores]]] = {INSTANCES: [], BASE: []}
    if tier == W.SUBJECT_TIER:
        references[CEILING] = []
    for concept in concepts:
        inst = instances[concept.name]
        references[INSTANCES].append((concept, score(inst, [None] * len(inst), concept, inst, diversity)))
        progress(f"base model: {concept.name}")
        for label, prompts in ((BASE, prompts_for(concept)), (CEILING, explicit_prompts(concept))):
            if label in references:
                images, bgs = render_prompts(pipe, prompts, None, config)
                references[label].append((concept, score(images, bgs, concept, inst, diversity)))
                gallery[concept.name][label] = images[:: config.images_per_background]
    ceilings = {c.name: s.fidelity for c, s in references[CEILING]} if CEILING in references else None
    rows = [table_row(label, scored, ceilings) for label, scored in references.items()]
    for run in runs:
        scored, times = [], {"train_s": 0.0, "wall_s": 0.0, "first_step_s": 0.0}
        trainable = file_bytes = 0
        for concept in concepts:
            progress(f"{run.label}: {concept.name}")
            run_dir = work / "runs" / _slug(run.label) / concept.name  # lora:preset=x -> runs/lora-preset-x
            result, first_step_s = train_concept(run, work / "instances" / concept.name, run_dir, config)
            images, bgs = render_concept(pipe, concept, result.adapter_path, config)
            scored.append((concept, score(images, bgs, concept, instances[concept.name], diversity)))
            gallery[concept.name][run.label] = images[:: config.images_per_background]
            trainable, file_bytes = result.num_trainable, adapter_info(result.adapter_path)["file_size"]
            times["train_s"] += result.train_time / len(concepts)
            times["wall_s"] += result.wall_time / len(concepts)
            # the slowest start: the first concept's, when class images (prior 'images') are generated into an empty cache
            times["first_step_s"] = max(times["first_step_s"], first_step_s)
        setting = asdict(run.setting) | {"description": run.setting.describe()}
        extra = dict(method=run.method, group=run.group, kind=run.kind, setting=setting, point=dict(run.point))
        rows.append(table_row(run.label, scored, ceilings, trainable=trainable, file_bytes=file_bytes, **extra, **times))
    grid = work / grid_name
    gallery_grid(gallery, [row["label"] for row in rows[1:]]).save(grid)
    splits = "/".join(dict.fromkeys(c.split for c in concepts))  # one split unless concepts were named from both
    return {"concepts": [c.name for c in concepts], "rows": rows, "grid": str(grid)} | ({"split": splits} if tier == W.SUBJECT_TIER else {})


def _slug(label: str) -> str:
    """A folder name of a row label: `lora:preset=x` -> `lora-preset-x`, `lora (paper default)` -> `lora-paper-default`."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-")


def plan_runs(config: QualityConfig) -> list[Run]:
    """The rows to train, each checked as a whole TrainConfig: a bad value fails here, before any training."""
    config.validate()
    runs = quality_runs([parse_method_spec(text) for text in (config.methods or method_names())], config)
    for run in runs:
        train_config_of(run, config)
    return runs


def run_quality(config: QualityConfig, diversity: Diversity, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from ..models import load_pipeline

    began = time.perf_counter()
    runs = plan_runs(config)
    tiers = select_concepts(config)
    pipe = load_pipeline("shapes", device="cuda" if torch.cuda.is_available() else "cpu")
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base = None
    if config.base_images:
        progress("base quality")
        base = base_quality(pipe, config)
        base_grid(base.pop("_images")).save(work / "base-grid.png")
    tables = {
        tier: measure_tier(pipe, tier, concepts, runs, config, diversity, progress, f"grid-{tier}.png") for tier, concepts in tiers.items()
    }
    return {
        "settings": asdict(config)
        | {
            "concepts": {tier: [c.name for c in concepts] for tier, concepts in tiers.items()},
            "methods": [run.label for run in runs],
            "token": TOKEN,
            "prompts": [p for p, _ in prompts_for(W.SUBJECTS[0])],
        },
        "base_quality": base,
        "tiers": tables,
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
    """The base-quality table and each tier's table (the subject tier first)."""
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
    tables = record["tiers"]
    if W.SUBJECT_TIER in tables:
        lines += [subject_table(tables[W.SUBJECT_TIER]), ""]
    if W.OUTLINES in tables:
        lines += [outline_table(tables[W.OUTLINES]), ""]
    return "\n".join(lines).rstrip("\n")


SHARE_HEADER = "Share of ceiling (per subject: fidelity / its ceiling's, averaged)"


def subject_table(table: dict[str, Any]) -> str:
    """The subject tier: fidelity absolute and as a share of the ceiling, alignment, cosine, diversity, train time."""
    names = ", ".join(table["concepts"])
    lines = [
        f"Subject tier, {table['split']} split ({names}): subjects made only of parts pretraining drew. The ceiling is the "
        "base model prompted with each subject's own words on the same backgrounds and seeds; share of ceiling is, per "
        "subject, the row's fidelity divided by that subject's ceiling fidelity, then averaged over subjects (a subject "
        "whose ceiling is 0 is left out; '-' when all are).",
        "",
        f"| Method | Setting | Fidelity (judge) | {SHARE_HEADER} | Alignment (background) | Cosine to instances "
        "| Diversity (Vendi) | Train time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table["rows"]:
        s = row["scores"]
        cells = [_num(s["fidelity"]), _num(row["share_of_ceiling"]), _num(s["alignment"]), _num(s["cosine"]), _num(s["diversity"])]
        lines.append(f"| {row['label']} | {_setting(row)} | {' | '.join(cells)} | {_num(row['train_s'], '.1f')} |")
    return "\n".join(lines)


def outline_table(table: dict[str, Any]) -> str:
    """The new-outline tier: the scores, size and times of each row."""
    lines = [
        f"New-outline tier ({', '.join(table['concepts'])}): a shape or pattern pretraining never drew.",
        "",
        "| Method | Setting | Fidelity (judge) | Cosine to instances | Alignment (background) | Diversity (Vendi) "
        "| Trainable | File | Train time (s) | Whole run (s) | First step after (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table["rows"]:
        s = row["scores"]
        size = f"{row['file_bytes'] / 1024:.1f} KB" if row.get("file_bytes") else "-"
        trainable = f"{row['trainable']:,}" if row["trainable"] else "-"
        scores = " | ".join([_num(s["fidelity"]), _num(s["cosine"]), _num(s["alignment"]), _num(s["diversity"])])
        times = " | ".join(_num(row[k], ".1f") for k in ("train_s", "wall_s", "first_step_s"))
        lines.append(f"| {row['label']} | {_setting(row)} | {scores} | {trainable} | {size} | {times} |")
    return "\n".join(lines)


def _num(value: float | None, spec: str = ".2f") -> str:
    """A table cell: '-' for a missing value, NaN (no such score) or a zero time."""
    if value is None or not np.isfinite(value) or (spec == ".1f" and value == 0):
        return "-"
    return format(value, spec)


def _setting(row: dict[str, Any]) -> str:
    """The row's setting: 'tuned: 20x lr, 300 steps, preset=attention_convs' ('-' for a reference row)."""
    return f"{row['kind']}: {row['setting']['description']}" if row["setting"] else "-"
