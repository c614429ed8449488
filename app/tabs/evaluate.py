"""Evaluate tab: `metrics.evaluate` on one generation run of a concept against its training images.

The report is written next to the run (report.json, report.md, report.png through
`metrics.report.write_report`); the tab shows the markdown and the fidelity/alignment plot. On a
built-in base model the offline embedders are preselected (`base_model.BaseModel.embedders`): the
shapes judge for `shapes`, the random `tiny` stand-ins for the random-weight models; the real
backbones need downloads.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from metrics import evaluate
from metrics.catalog import DEFAULT_METRICS, METRICS
from metrics.report import markdown_table, run_label, write_report

from ..feedback import guarded
from ..state import AppState
from .common import refreshed_picker

EMBEDDER_CHOICES = [
    ("shapes: the shapes-world judge (for the built-in shapes model)", "shapes"),
    ("tiny: random offline embedders (demo, numbers mean nothing)", "tiny"),
    ("default: DINO, DINOv2, CLIP, Inception (downloaded on first use)", "default"),
]


def build(state: AppState) -> dict[str, Any]:
    with gr.Row():
        concept = gr.Dropdown(label="Concept", elem_id="eval-concept")
        run = gr.Dropdown(label="Generated images (one Generate click each)", elem_id="eval-run")
    with gr.Row():
        embedders = gr.Dropdown(EMBEDDER_CHOICES, value=state.base.embedders, label="Embedders", elem_id="eval-embedders")
        metric_names = gr.CheckboxGroup(list(METRICS), value=list(DEFAULT_METRICS), label="Metrics", elem_id="eval-metrics")
    button = gr.Button("Evaluate", variant="primary", elem_id="eval-button")
    status = gr.Markdown(elem_id="eval-status")
    with gr.Row():
        table = gr.Markdown(elem_id="eval-table")
        plot = gr.Image(label="Fidelity vs prompt alignment", show_label=False, type="filepath", interactive=False, elem_id="eval-plot")
    with gr.Accordion("Backbones, preprocessing and aggregation of each number", open=False):
        details = gr.Markdown(elem_id="eval-details")

    def runs_of(concept_id: str | None) -> gr.Dropdown:
        runs = state.workspace.generation_runs(concept_id) if concept_id else []
        return gr.Dropdown(choices=runs, value=runs[0] if runs else None)

    concept.change(runs_of, concept, run)

    @guarded
    def on_evaluate(concept_id, run_name, embedder_set, chosen_metrics):
        if not concept_id:
            raise gr.Error("pick a concept first (train one in the Train tab)")
        if not run_name:
            raise gr.Error("this concept has no generated images yet; make some in the Generate tab")
        chosen = state.workspace.get(concept_id)
        report = evaluate(
            state.workspace.images_dir(concept_id),
            state.workspace.generated_dir(concept_id) / run_name,
            metrics=chosen_metrics,
            embedders=embedder_set,
            placeholder_tokens=chosen.token,
        )
        paths = write_report(report, state.workspace.evaluation_dir(concept_id, run_name) / "report.json")
        skipped = "".join(f"\n- `{name}` skipped: {why}" for name, why in report["skipped"].items())
        return (
            markdown_table({run_label(report): report}),
            str(paths["plot"]),
            paths["markdown"].read_text(encoding="utf-8"),
            f"Report saved as `{paths['json'].relative_to(state.workspace.root)}`.{skipped}",
        )

    button.click(on_evaluate, [concept, run, embedders, metric_names], [table, plot, details, status])

    def refresh(current: str | None):
        picker, value = refreshed_picker(state.workspace, current, allow_none=False)
        return picker, runs_of(value)

    return {"refresh": (refresh, [concept], [concept, run])}
