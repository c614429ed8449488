"""Reports for people: report.json (atomic), a markdown table and the fidelity/alignment plot, per run or compared."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from metrics.atomic import write_text_atomic
from metrics.plot import LABELS, plot_fidelity_alignment

COLUMNS = {  # metric -> (header, format of the value)
    "dino": ("DINO ↑", "{:.3f}"),
    "dinov2": ("DINOv2 ↑", "{:.3f}"),
    "clip_i": ("CLIP-I ↑", "{:.3f}"),
    "clip_t": ("CLIP-T ↑", "{:.3f}"),
    "vendi": ("Vendi ↑", "{:.2f}"),
    "kid": ("KID ↓", "{:.4f}"),
    "fid": ("FID ↓", "{:.2f}"),
}


def run_label(report: Mapping) -> str:
    """A short name for a run: its adapter methods, else the generated folder's name."""
    methods = report.get("run", {}).get("methods") or []
    return "+".join(methods) if methods else Path(report["inputs"]["generated"]).name


def _cell(report: Mapping, metric: str) -> str:
    entry = report["metrics"].get(metric)
    if entry is None:
        return "skipped" if metric in report.get("skipped", {}) else "–"
    text = COLUMNS[metric][1].format(entry["value"])
    return f"{text} ± {entry['std']:.4f}" if "std" in entry else text


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(reports: Mapping[str, Mapping]) -> str:
    """One row per run: image counts and each metric's value (mean over subjects)."""
    present = [m for m in COLUMNS if any(m in r["metrics"] or m in r.get("skipped", {}) for r in reports.values())]
    lines = [
        _row(["run", "subjects", "real", "generated", *(COLUMNS[m][0] for m in present)]),
        _row(["---"] * (4 + len(present))),
    ]
    for label, report in reports.items():
        counts = report["subjects"].values()
        real = sum(c["real_images"] for c in counts)
        generated = sum(c["generated_images"] for c in counts)
        lines.append(_row([label, str(len(report["subjects"])), str(real), str(generated), *(_cell(report, m) for m in present)]))
    return "\n".join(lines)


def _subject_table(report: Mapping) -> str:
    per_subject = [m for m in COLUMNS if "per_subject" in report["metrics"].get(m, {})]
    lines = [_row(["subject", "real", "generated", *(COLUMNS[m][0] for m in per_subject)]), _row(["---"] * (3 + len(per_subject)))]
    for subject, counts in report["subjects"].items():
        values = [COLUMNS[m][1].format(report["metrics"][m]["per_subject"][subject]) for m in per_subject]
        lines.append(_row([subject, str(counts["real_images"]), str(counts["generated_images"]), *values]))
    return "\n".join(lines)


def _provenance(reports: Mapping[str, Mapping]) -> str:
    """Backbone, preprocessing and aggregation of every number, grouped when runs share them."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for label, report in reports.items():
        for metric, entry in report["metrics"].items():
            key = (metric, entry["backbone"], entry["preprocessing"], entry["aggregation"])
            groups.setdefault(key, []).append(label)
    lines = [_row(["metric", "backbone", "preprocessing", "aggregation", "runs"]), _row(["---"] * 5)]
    for (metric, backbone, preprocessing, aggregation), labels in groups.items():
        name = LABELS.get(metric, metric.upper())
        lines.append(_row([name, backbone, preprocessing, aggregation, ", ".join(labels)]))
    return "\n".join(lines)


def markdown_report(reports: Mapping[str, Mapping]) -> str:
    """The full markdown document: summary table, per-subject table (single run), provenance, skips."""
    parts = ["# Personalization metrics", "", markdown_table(reports), ""]
    if len(reports) == 1:
        (report,) = reports.values()
        if len(report["subjects"]) > 1:
            parts += ["## Per subject", "", _subject_table(report), ""]
    parts += [
        "Values are computed per subject, then averaged over subjects (KID and FID pool all subjects). Cosines are raw (not x100).",
        "",
        "## Backbones, preprocessing, aggregation",
        "",
        _provenance(reports),
        "",
    ]
    skips = [f"- {label}: `{m}` skipped: {why}" for label, r in reports.items() for m, why in r["skipped"].items()]
    if skips:
        parts += ["## Skipped", "", *skips, ""]
    return "\n".join(parts)


def write_report(report: Mapping, json_path: os.PathLike | str) -> dict[str, Path]:
    """Write report.json, report.md and report.png side by side; returns their paths."""
    json_path = Path(json_path)
    if json_path.is_dir():
        raise ValueError(f"the report output must be a file path such as report.json, got the folder {json_path}")
    paths = {"json": json_path, "markdown": json_path.with_suffix(".md"), "plot": json_path.with_suffix(".png")}
    reports = {run_label(report): report}
    write_text_atomic(paths["json"], json.dumps(report, indent=2) + "\n")
    write_text_atomic(paths["markdown"], markdown_report(reports))
    plot_fidelity_alignment(reports, paths["plot"])
    return paths


def write_comparison(reports: Mapping[str, Mapping], out_dir: os.PathLike | str) -> dict[str, Path]:
    """One table and one plot comparing runs (label -> report): comparison.json/.md/.png in `out_dir`."""
    if not reports:
        raise ValueError("write_comparison needs at least one report (a mapping label -> report)")
    out = Path(out_dir)
    paths = {"json": out / "comparison.json", "markdown": out / "comparison.md", "plot": out / "comparison.png"}
    write_text_atomic(paths["json"], json.dumps(dict(reports), indent=2) + "\n")
    write_text_atomic(paths["markdown"], markdown_report(reports))
    plot_fidelity_alignment(reports, paths["plot"])
    return paths
