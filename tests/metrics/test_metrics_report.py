"""Reports for people: report.json (atomic), markdown tables, the plot, and multi-run comparisons."""

from __future__ import annotations

import json

from PIL import Image

from metrics.report import markdown_report, markdown_table, run_label, write_comparison, write_report


def fake_report(method: str, dino: float, clip_t: float | None, vendi: float, subjects=("dog",)) -> dict:
    def entry(value: float, metric: str) -> dict:
        return {
            "value": value,
            "flat": value,
            "per_subject": {s: value for s in subjects},
            "backbone": f"{metric}-net",
            "preprocessing": "resize 224",
            "aggregation": "per subject mean",
            "higher_is_better": True,
        }

    metrics = {"dino": entry(dino, "dino"), "vendi": entry(vendi, "dinov2")}
    if clip_t is not None:
        metrics["clip_t"] = entry(clip_t, "clip")
    return {
        "inputs": {"generated": f"/runs/{method}-out"},
        "run": {"methods": [method], "base_models": ["sd15"]},
        "subjects": {s: {"real_images": 4, "generated_images": 8} for s in subjects},
        "metrics": metrics,
        "skipped": {} if clip_t is not None else {"clip_t": "no prompts"},
    }


def test_markdown_table_has_one_row_per_run():
    reports = {"lora": fake_report("lora", 0.6684, 0.3051, 4.84), "ti": fake_report("ti", 0.569, None, 9.37)}
    table = markdown_table(reports)
    lines = table.splitlines()
    assert lines[0] == "| run | subjects | real | generated | DINO ↑ | CLIP-T ↑ | Vendi ↑ |"
    assert lines[2] == "| lora | 1 | 4 | 8 | 0.668 | 0.305 | 4.84 |"
    assert lines[3] == "| ti | 1 | 4 | 8 | 0.569 | skipped | 9.37 |"


def test_markdown_report_lists_provenance_subjects_and_skips():
    text = markdown_report({"lora": fake_report("lora", 0.6, None, 3.0, subjects=("cat", "dog"))})
    assert "| DINO | dino-net | resize 224 | per subject mean | lora |" in text
    assert "## Per subject" in text and "| cat | 4 | 8 | 0.600 | 3.00 |" in text
    assert "- lora: `clip_t` skipped: no prompts" in text


def test_write_report_writes_json_markdown_and_plot_atomically(tmp_path):
    report = fake_report("lora", 0.6, 0.3, 4.0)
    paths = write_report(report, tmp_path / "out" / "report.json")
    assert json.loads(paths["json"].read_text()) == report
    assert paths["markdown"].name == "report.md" and "| lora |" in paths["markdown"].read_text()
    assert Image.open(paths["plot"]).format == "PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md", "report.png"]


def test_write_comparison_makes_one_table_and_one_plot(tmp_path):
    reports = {"DreamBooth": fake_report("lora", 0.668, 0.305, 5.0), "TI": fake_report("ti", 0.569, 0.255, 9.0)}
    paths = write_comparison(reports, tmp_path)
    assert set(json.loads(paths["json"].read_text())) == {"DreamBooth", "TI"}
    text = paths["markdown"].read_text()
    assert "| DreamBooth | 1 | 4 | 8 | 0.668 | 0.305 | 5.00 |" in text and "| TI |" in text
    assert Image.open(paths["plot"]).size[0] > 100


def test_plot_without_clip_t_still_writes_an_explaining_png(tmp_path):
    paths = write_report(fake_report("lora", 0.6, None, 2.0), tmp_path / "r.json")
    assert Image.open(paths["plot"]).format == "PNG"


def test_run_label_falls_back_to_the_folder_name():
    report = fake_report("lora", 0.6, 0.3, 2.0)
    assert run_label(report) == "lora"
    report["run"]["methods"] = []
    assert run_label(report) == "lora-out"
