"""`personalize bench --quality --sweep KEY=V1,V2,...`: every method at every point of a grid of
settings on the subject tier (typically its tuning split), the winner per method by a stated rule, and
the winner's `recipe.TUNED` entry with the command that chose it.

A key is a recipe knob (`lr_factor`, `steps`), a `TrainConfig` field (`batch_size`, `snr_gamma`
(`none` = off), `prior`, ...; a field that is also a method option means the field) or an option of
every method swept (`rank`, `preset`, ...). Values are typed as the rest of the product types them:
TrainConfig fields and knobs by `personalize.options`, method options as in `--methods
lora:rank=8` (`parse_method_spec`, the method's own option checks); every point is checked as a whole
TrainConfig before any training.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..adapters import get_method, method_names
from ..errors import UserError
from ..options import coerce_options, describe
from ..shapes import recipe
from ..shapes import world as W
from ..training.config import FIELDS, TrainConfig
from .config import MethodSpec, parse_method_spec
from .quality import (
    CEILING,
    QualityConfig,
    Run,
    _num,
    measure_tier,
    prompts_for,
    select_concepts,
    train_config_of,
    with_config,
)

KNOBS = ("lr_factor", "steps")  # the recipe's own knobs (fields of recipe.Tuned)
# TrainConfig fields a sweep cannot set: the bench sets them itself, or a knob stands for them.
FIXED = {
    "instance_images": "the bench writes the subject's images",
    "output_dir": "the bench names each run's folder",
    "base_model": "the quality bench measures `shapes`",
    "method": "choose methods with --methods",
    "method_options": "sweep an option by its name (e.g. rank=4,8)",
    "text_encoder_options": "a table of options, not one value",
    "lr": "sweep lr_factor (times each method's paper rate), which fits every method",
    "validation_every": "the bench renders and judges after training",
    "checkpoint_every": "the bench keeps no checkpoints",
    "resume": "every run starts afresh",
    "overwrite": "every run starts afresh",
    "cpu": "the bench picks the device",
}
ALIGNMENT_FLOOR = 0.7
RULE = (
    f"the winner per method is the setting with the highest mean share of ceiling among those with alignment >= "
    f"{ALIGNMENT_FLOOR}; if none reaches {ALIGNMENT_FLOOR}, the highest share of ceiling x alignment (ties: the first listed)"
)


def parse_sweep(texts: Sequence[str], methods: Sequence[str]) -> dict[str, list[Any]]:
    """`KEY=V1,V2,...` texts as key -> typed values, each value checked for every method in `methods` (names)."""
    sweep: dict[str, list[Any]] = {}
    for text in texts:
        key, eq, rest = (part.strip() for part in text.partition("="))
        values = [v.strip() for v in rest.split(",")]
        if not eq or not key or not all(values):
            raise UserError(f"--sweep '{text}' must be KEY=V1,V2,... (e.g. lr_factor=10,20,40)")
        if key in sweep:
            raise UserError(f"--sweep key '{key}' is given twice; accepted: each key once, with all its values")
        sweep[key] = [typed_value(key, value, methods) for value in values]
    return sweep


def typed_value(key: str, value: str, methods: Sequence[str]) -> Any:
    """One sweep value of `key` typed (a UserError naming key, value and what is accepted otherwise)."""
    if key in KNOBS:
        typed = _typed(recipe.Tuned, key, value)
        if typed <= 0:
            raise UserError(f"--sweep {key}={value}: must be a positive number")
        return typed
    if key in FIXED:
        raise UserError(f"--sweep key '{key}' cannot be swept ({FIXED[key]}); accepted: {_accepted(methods)}")
    if key in FIELDS:
        return _typed(TrainConfig, key, value)
    lacking = [m for m in methods if key not in _option_names(m)]
    if not lacking:
        typed = [parse_method_spec(f"{m}:{key}={value}").options[key] for m in methods]  # each method's own checks
        return typed[0]
    if len(lacking) < len(methods):
        raise UserError(f"--sweep key '{key}' is not an option of method(s) {', '.join(lacking)}; sweep it with methods that all have it")
    raise UserError(f"unknown --sweep key '{key}'; accepted: {_accepted(methods)}")


def _typed(cls: type, key: str, value: str) -> Any:
    """`value` typed by the annotation of field `key` of the dataclass `cls` (personalize.options' reading)."""
    try:
        return coerce_options(cls, {key: value}, "sweep")[key]
    except UserError:
        raise UserError(f"--sweep {key}={value}: must be {describe(typing.get_type_hints(cls)[key])}") from None


def _option_names(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(get_method(method).config_cls)}


def _accepted(methods: Sequence[str]) -> str:
    options = set.intersection(*(_option_names(m) for m in methods)) if methods else set()
    return (
        f"{', '.join(KNOBS)}, a training setting (a TrainConfig field, see `personalize train --help`), or an option of every "
        f"method swept ({', '.join(sorted(options)) or 'none in common'})"
    )


def points(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the sweep's values (their product), the first key varying slowest."""
    return [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]


def point_label(point: dict[str, Any]) -> str:
    return " ".join(f"{key}={recipe.value_text(value)}" for key, value in point.items())


def apply(setting: recipe.Tuned, point: dict[str, Any], method: str) -> recipe.Tuned:
    """`setting` with the point's values: knobs replace, TrainConfig fields override, method options add."""
    knobs = {k: v for k, v in point.items() if k in KNOBS}
    fields = {k: v for k, v in point.items() if k not in KNOBS and k in FIELDS}
    options = {k: v for k, v in point.items() if k not in KNOBS and k not in FIELDS}
    return dataclasses.replace(setting, **knobs, options=setting.options | options, overrides=setting.overrides | fields)


def sweep_runs(specs: Sequence[MethodSpec], sweep: dict[str, list[Any]], config: QualityConfig) -> list[Run]:
    """Each spec at every point, starting from its method's setting (tuned or the recipe's)."""
    runs = []
    for spec in specs:
        start = with_config(recipe.setting(spec.name), spec.options, config)
        for point in points(sweep):
            runs.append(Run(f"{spec.label} {point_label(point)}", spec.name, spec.label, "sweep", apply(start, point, spec.name), point))
    return runs


def winner(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    """(the winning row, why) of one method's rows by `RULE`; None when no row has a share of ceiling."""
    known = [r for r in rows if math.isfinite(r["share_of_ceiling"]) and math.isfinite(r["scores"]["alignment"])]
    aligned = [r for r in known if r["scores"]["alignment"] >= ALIGNMENT_FLOOR]
    if aligned:
        return max(aligned, key=lambda r: r["share_of_ceiling"]), f"highest share of ceiling with alignment >= {ALIGNMENT_FLOOR}"
    if known:
        best = max(known, key=lambda r: r["share_of_ceiling"] * r["scores"]["alignment"])
        return best, f"no setting reached alignment {ALIGNMENT_FLOOR}: highest share of ceiling x alignment"
    return None


def winners(rows: Sequence[dict[str, Any]], command: str) -> dict[str, dict[str, Any]]:
    """Per method configuration (its `--methods` spec): the winner's label, why, and its recipe entry."""
    chosen = {}
    for group in dict.fromkeys(r["group"] for r in rows if r["kind"] == "sweep"):
        picked = winner([r for r in rows if r["group"] == group])
        if picked is None:
            chosen[group] = {"label": None, "why": "no share of ceiling (every ceiling fidelity is 0)", "entry": None}
            continue
        row, why = picked
        tuned = recipe.Tuned(**{k: row["setting"][k] for k in ("lr_factor", "steps", "options", "overrides")}, source=command)
        chosen[group] = {"label": row["label"], "why": why, "setting": asdict(tuned), "entry": tuned.entry(row["method"])}
    return chosen


def plan_sweep(config: QualityConfig, sweep: dict[str, list[Any]]) -> tuple[list[W.Concept], list[Run]]:
    """(the subjects, the rows to train), each row checked as a whole TrainConfig: a bad combination fails
    here, before any training."""
    config.validate()
    tiers = select_concepts(dataclasses.replace(config, tier=W.SUBJECT_TIER) if not config.concepts else config)
    if set(tiers) != {W.SUBJECT_TIER}:
        raise UserError(f"--sweep measures subjects (share of ceiling); accepted concepts: {', '.join(s.name for s in W.SUBJECTS)}")
    runs = sweep_runs([parse_method_spec(text) for text in (config.methods or method_names())], sweep, config)
    for run in runs:
        try:
            train_config_of(run, config)
        except UserError as exc:
            raise UserError(f"--sweep {point_label(run.point)} with {run.group}: {exc}") from None
    return tiers[W.SUBJECT_TIER], runs


def run_sweep(
    config: QualityConfig,
    sweep: dict[str, list[Any]],
    diversity: Callable[[torch.Tensor], float],
    progress: Callable[[str], None] = lambda _: None,
    command: str = "personalize bench --quality --sweep ...",
) -> dict[str, Any]:
    """Train and judge every method x point on the subject tier; the rows, the winners (with `command`
    as their source) and a grid image."""
    from ..models import load_pipeline

    began = time.perf_counter()
    concepts, runs = plan_sweep(config, sweep)
    pipe = load_pipeline("shapes", device="cuda" if torch.cuda.is_available() else "cpu")
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    table = measure_tier(pipe, W.SUBJECT_TIER, concepts, runs, config, diversity, progress, "grid-sweep.png")
    return {
        "settings": asdict(config)
        | {
            "concepts": table["concepts"],
            "methods": list(dict.fromkeys(run.group for run in runs)),
            "sweep": sweep,
            "token": recipe.TOKEN,
            "prompts": [p for p, _ in prompts_for(concepts[0])],
        },
        "split": table["split"],
        "rule": RULE,
        "rows": table["rows"],
        "winners": winners(table["rows"], command),
        "grid": table["grid"],
        "command": command,
        "total_s": time.perf_counter() - began,
    }


def markdown(record: dict[str, Any]) -> str:
    """The sweep table (one row per method x setting, winners marked), then each winner's recipe entry."""
    split, names = record["split"], ", ".join(record["settings"]["concepts"])
    ceiling = next(r for r in record["rows"] if r["label"] == CEILING)
    per_subject = ", ".join(f"{name} {s['fidelity']:.2f}" for name, s in ceiling["per_concept"].items())
    caution = "" if split == W.TUNING else " Chosen on the evaluation split: settings should be chosen on the tuning split."
    lines = [
        f"Sweep on the subject tier's {split} split ({names}); explicit-prompt ceiling fidelity: {per_subject}. Share of "
        f"ceiling: per subject, fidelity / that subject's ceiling fidelity, averaged over subjects (ceilings of 0 left out). "
        f"Winner (**bold**): {RULE}.{caution}",
        "",
        "| Method | Setting | Fidelity | Share of ceiling | Alignment | Cosine | Diversity | Train (s) | Winner |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    won = {w["label"]: w["why"] for w in record["winners"].values() if w["label"]}
    for row in record["rows"]:
        if row["kind"] == "reference" and row["label"] != CEILING:
            continue
        s = row["scores"]
        cells = [_num(s["fidelity"]), _num(row["share_of_ceiling"]), _num(s["alignment"]), _num(s["cosine"]), _num(s["diversity"])]
        label = f"**{row['label']}**" if row["label"] in won else row["label"]
        setting = row["setting"]["description"] if row["setting"] else "-"
        lines.append(f"| {label} | {setting} | {' | '.join(cells)} | {_num(row['train_s'], '.1f')} | {won.get(row['label'], '')} |")
    lines += ["", f"Command: `{record['command']}`", "", "Recipe entries (`personalize/shapes/recipe.py`, `TUNED`), one per method:", ""]
    lines += ["```python", *(w["entry"] or f"# {group}: {w['why']}" for group, w in record["winners"].items()), "```"]
    return "\n".join(lines)
