"""Write a benchmark record: `bench.json`, a markdown table section in BENCHMARKS.md, a PNG chart.

The markdown goes between markers keyed by device, precision and resolution, so a CPU table and a
CUDA table live side by side and a rerun replaces only its own section; the rest of the file (the
hand-written analysis) is kept.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_json_atomic, write_text_atomic
from .config import FLOOR, REFERENCE

TITLE = "# Benchmarks\n\nMeasured by `personalize bench`; sections below are rewritten by each run.\n"


def section_key(record: dict[str, Any]) -> str:
    env, settings = record["environment"], record["settings"]
    key = f"{env['device']}-{env['compute_dtype']}-{settings['resolution']}px-{settings['base_model']}"
    return key + ("-text-encoder" if settings.get("text_encoder") else "")  # its own section: more steps ran between rounds


def _size(n: int) -> str:
    if n <= 0:
        return "-"
    if n < 2**20:
        return f"{n / 2**10:.1f} KB"
    return f"{n / 2**20:.1f} MB"


def _label(r: dict[str, Any]) -> str:
    if r["label"] == FLOOR:
        return "none (frozen floor)"
    if r["label"] == REFERENCE:
        return "lora r=4 (reference)"
    return r["label"]


def _attach(r: dict[str, Any]) -> str:
    warm = r.get("attach_warm_s")  # records before the decomposition cache have one attach time
    return f"{r['attach_s']:.1f}" if warm is None else f"{r['attach_s']:.1f} / {warm:.1f}"


def forms_table(record: dict[str, Any]) -> str:
    """Which forward form each method's layers ran in training (adapters/forms.py), one row per method."""
    names = sorted({name for r in record["results"] for name in r.get("forms", {})})
    if not names:
        return ""
    rows = ["| Method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for r in record["results"]:
        if r.get("forms"):
            rows.append(f"| {_label(r)} | " + " | ".join(str(r["forms"].get(name, "")) for name in names) + " |")
    return "\n".join(rows)


def markdown_table(record: dict[str, Any]) -> str:
    """One row per method; on CPU also the LoRA ratio of process CPU time (robust on a shared machine)."""
    cpu = record["environment"]["device"] == "cpu"
    rows = [
        "| Method | Trainable | File | Attach cold / warm (s) | Train step (s) | vs LoRA | vs floor |"
        + (" vs LoRA, CPU time |" if cpu else "")
        + " Memory (MB) | Merged infer. (s) | vs base |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---:|",
    ]
    for r in record["results"]:
        floor = r["label"] == FLOOR
        rows.append(
            f"| {_label(r)} | {r['trainable']:,} | {_size(r['file_bytes'])} | "
            f"{'-' if floor else _attach(r)} | {r['train_median_s']:.3f} | "
            f"{r['train_ratio_lora']:.2f} | {r['train_ratio_floor']:.2f} |"
            + (f" {r['train_cpu_ratio_lora']:.2f} |" if cpu else "")
            + f" {r['memory_mb']:,.0f} | {r['inference_median_s']:.3f} | {r['inference_ratio_base']:.2f} |"
        )
    return "\n".join(rows)


def text_table(record: dict[str, Any]) -> str:
    """One row per method measured with the text encoder(s) training too ('' when they were not)."""
    rows = [r for r in record["results"] if r.get("text_encoder")]
    if not rows:
        return ""
    cpu = record["environment"]["device"] == "cpu"
    lines = [
        "| Method | Text-encoder trainable | Train step (s) | vs UNet-only |"
        + (" vs UNet-only, CPU time |" if cpu else "")
        + " Memory (MB) | vs UNet-only | Added (MB) |",
        "|---|---:|---:|---:|" + ("---:|" if cpu else "") + "---:|---:|---:|",
    ]
    for r in rows:
        t = r["text_encoder"]
        if not t["target"]:
            lines.append(f"| {_label(r)} | no text-encoder target | - | - |" + (" - |" if cpu else "") + " - | - | - |")
            continue
        memory_ratio = "-" if t["memory_ratio_unet"] is None else f"{t['memory_ratio_unet']:.2f}"
        lines.append(
            f"| {_label(r)} | {t['trainable']:,} | {t['train_median_s']:.3f} | {t['train_ratio_unet']:.2f} |"
            + (f" {t['train_cpu_ratio_unet']:.2f} |" if cpu else "")
            + f" {t['memory_mb']:,.0f} | {memory_ratio} | {t['memory_added_mb']:+,.1f} |"
        )
    return "\n".join(lines)


def text_section(record: dict[str, Any]) -> list[str]:
    """The "With the text encoder training" part of a section: what was measured, then `text_table`."""
    table = text_table(record)
    if not table:
        return []
    sizes = ", ".join(f"{part} {count / 1e6:.1f}M parameters" for part, count in record.get("text_encoders", {}).items())
    return [
        "",
        "#### With the text encoder training",
        "",
        f"Each method also on the text encoder(s) ({sizes}): its adapter on their attention projections (q, k, v, out; "
        "the same method and options), a fixed prompt's 77 token ids -> text encoder(s) -> UNet -> MSE -> backward "
        "through both -> AdamW on both adapters. Timed back to back with the method's UNet-only step in every round; "
        "**vs UNet-only** is the median of those per-round ratios. Memory is the peak over the same frozen models at "
        "rest as the UNet-only column; **Added** is the difference.",
        "",
        table,
    ]


def _timed_steps(record: dict[str, Any]) -> str:
    """The timed steps per method, and the rounds asked for when a time limit ran fewer."""
    asked, rounds = record["settings"]["steps"], record.get("timed_rounds")
    if not rounds or (rounds["train"], rounds["inference"]) == (asked, asked):
        return f"{asked} timed steps per method"
    limit = record["settings"]["time_limit"]
    return f"{rounds['train']} timed training and {rounds['inference']} inference steps per method ({asked} asked; {limit:g} s time limit)"


def markdown_section(record: dict[str, Any], chart: str | None) -> str:
    env, s = record["environment"], record["settings"]
    load = env.get("load_average_before"), env.get("load_average")
    load_text = (
        f"; load average {load[0][0]:.1f} before / {load[1][0]:.1f} after (1 min, {env['cpu_count']} CPUs)" if load[0] and load[1] else ""
    )
    gpu = f"{env['device_name']} ({env['gpu_memory_gb']} GB), host " if "gpu_memory_gb" in env else ""
    lines = [
        f"### {env['device'].upper()}, {env['compute_dtype']}"
        f"{' autocast' if env['autocast'] else ''}, {s['resolution']} px, `{s['base_model']}`",
        "",
        f"Command: `{record.get('command', 'personalize bench')}` ({record['created']}, {record['total_s']:.0f} s in all)",
        "",
        f"Machine: {gpu}{env['cpu']} ({env['cpu_count']} CPUs, {env['cpu_threads']} torch threads, "
        f"{env['memory_gb']} GB){load_text}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, "
        f"Python {env['python']}.",
        "",
        f"Batch {s['batch']}, latents {s['latent_size']}x{s['latent_size']}, weights {env['weight_dtype']}, "
        f"{_timed_steps(record)} (one per round, methods interleaved), {s['warmup']} warm-up; "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}. Times are medians; ratios are "
        "medians of per-round ratios; the CPU-time ratio uses process CPU seconds, which other jobs on a shared "
        "machine inflate far less than wall time when torch runs one thread. Memory: peak during a training step "
        "over the frozen model at rest "
        f"({'CUDA allocator' if env['device'] == 'cuda' else 'resident set'}), including the adapter's tensors and "
        "optimiser state.",
        "",
        markdown_table(record),
        *text_section(record),
    ]
    if record.get("skipped"):
        lines += ["", f"Not measured within the time limit ({s['time_limit']:g} s): {', '.join(record['skipped'])}."]
    forms = forms_table(record)
    if forms:
        lines += [
            "",
            f"Forward forms in training, layers per form (chosen by {s.get('forms', 'model')}; adapters/forms.py): "
            "weight = W0 + delta composed, activations = frozen layer + x through the update's factors, "
            "full = x through the adapted weight's factors alone, taps_* = filter atoms' two-stage conv.",
            "",
            forms,
        ]
    if chart:
        lines += ["", f"![train-step and merged-inference ratios]({chart})"]
    return "\n".join(lines)


def write_markdown(record: dict[str, Any], path: str | Path, chart_path: str | Path | None = None) -> Path:
    """Insert or replace this run's section of the markdown file `path` (created if missing)."""
    path = Path(path)
    chart = os.path.relpath(chart_path, path.parent if str(path.parent) else ".") if chart_path else None
    return write_section(path, section_key(record), markdown_section(record, chart))


def write_section(path: str | Path, key: str, body: str) -> Path:
    """Insert or replace the section `key` of the markdown file `path` (created if missing)."""
    path = Path(path)
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.is_file() else TITLE
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)
    return path


def write_chart(record: dict[str, Any], path: str | Path) -> Path:
    """Horizontal bars: training-step time and merged-inference time as ratios (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    results = record["results"]
    labels = [_label(r) for r in results]
    colours = ["#9e9e9e" if r["label"] in (FLOOR, REFERENCE) else "#3f7fbf" for r in results]
    env, s = record["environment"], record["settings"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(results) + 1.6), sharey=True)
    positions = range(len(results))
    train = [r["train_ratio_lora"] for r in results]
    left.barh(positions, train, color=colours)
    left.axvline(1.0, color="black", linewidth=1)
    left.set_xlabel("training step / LoRA r=4 (lower is faster)")
    infer = [r["inference_ratio_base"] for r in results]
    right.barh(positions, infer, color=colours)
    right.axvline(1.0, color="black", linewidth=1)
    right.set_xlabel("merged inference step / base UNet")
    for axis, values in ((left, train), (right, infer)):
        for y, value in zip(positions, values):
            axis.text(value, y, f" {value:.2f}", va="center", fontsize=8)
        axis.set_xlim(0, max(values) * 1.18)
    left.set_yticks(list(positions), labels)
    left.invert_yaxis()
    fig.suptitle(f"{env['device_name']} ({env['device']}, {env['compute_dtype']}), {s['resolution']} px, {s['base_model']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_json(record: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    write_json_atomic(path, record)
    return path
