"""Concepts tab: the library of learned concepts on disk; rename, delete (confirmed), download the adapter."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from ..feedback import guarded, human_count, human_duration, human_size
from ..state import AppState
from ..workspace import TRAINING, Concept
from .common import concept_choices

TABLE_COLUMNS = ["name", "method", "base model", "steps", "created", "parameters", "file size", "status"]


def concept_row(concept: Concept) -> list[str]:
    steps = f"{concept.steps_done}/{concept.steps}" if concept.steps_done != concept.steps else str(concept.steps)
    return [
        concept.name,
        concept.method,
        concept.base_model,
        steps,
        concept.created.replace("T", " ")[:16],
        human_count(concept.num_trainable),
        human_size(concept.file_size),
        concept.status,
    ]


def concept_table(state: AppState) -> pd.DataFrame:
    return pd.DataFrame([concept_row(c) for c in state.workspace.concepts()], columns=TABLE_COLUMNS)


def concept_details(concept: Concept) -> str:
    options = ", ".join(f"{k}={v}" for k, v in concept.method_options.items()) or "paper defaults"
    lines = [
        f"### {html.escape(concept.name)}",
        f"- prompt: `{concept.prompt}`",
        f"- method: **{concept.method}** ({html.escape(options)}), lr {concept.lr:g}, prior preservation: {concept.prior}",
        f"- base model: `{concept.base_model}`",
        f"- steps: {concept.steps_done} of {concept.steps}, training time {human_duration(concept.wall_time)}",
        f"- trainable parameters: {human_count(concept.num_trainable)}, adapter file: {human_size(concept.file_size)}",
        f"- training images: {len(concept.images)}, created {concept.created}",
        f"- status: {concept.status}" + (f" ({html.escape(concept.message)})" if concept.message else ""),
    ]
    return "\n".join(lines)


def build(state: AppState) -> dict[str, Any]:
    table = gr.Dataframe(concept_table(state), headers=TABLE_COLUMNS, interactive=False, label="Learned concepts", elem_id="concepts-table")
    with gr.Row():
        with gr.Column(scale=3):
            concept = gr.Dropdown(label="Concept", elem_id="concepts-pick")
            details = gr.Markdown(elem_id="concepts-details")
            with gr.Row():
                new_name = gr.Textbox(label="New name", elem_id="concepts-new-name", scale=3)
                rename = gr.Button("Rename", elem_id="concepts-rename", scale=1)
            with gr.Row():
                download = gr.DownloadButton("Download adapter", elem_id="concepts-download", interactive=False)
                delete = gr.Button("Delete", variant="stop", elem_id="concepts-delete", interactive=False)
            with gr.Row(visible=False) as confirm_row:
                confirm_text = gr.Markdown(elem_id="concepts-confirm-text")
                confirm = gr.Button("Yes, delete", variant="stop", elem_id="concepts-confirm")
                cancel = gr.Button("Cancel", elem_id="concepts-cancel")
        with gr.Column(scale=2):
            preview = gr.Image(label="Latest validation images", type="filepath", interactive=False, height=240, elem_id="concepts-preview")
    status = gr.Markdown(elem_id="concepts-status")

    def show(concept_id: str | None):
        """Details, preview, download and delete state of the selected concept."""
        if not concept_id:
            return "", None, gr.DownloadButton(value=None, interactive=False), gr.Button(interactive=False), gr.Row(visible=False)
        chosen = state.workspace.get(concept_id)
        adapter = state.workspace.adapter_path(concept_id)
        preview_path = state.workspace.preview_image(concept_id)
        return (
            concept_details(chosen),
            str(preview_path) if preview_path else None,
            gr.DownloadButton(value=str(adapter) if adapter.is_file() else None, interactive=adapter.is_file()),
            gr.Button(interactive=True),
            gr.Row(visible=False),
        )

    shown = [details, preview, download, delete, confirm_row]
    concept.change(guarded(show), concept, shown)

    def refresh(current: str | None = None):
        choices = concept_choices(state.workspace, usable_only=False)
        ids = [value for _, value in choices]
        value = current if current in ids else (ids[0] if ids else None)
        return (concept_table(state), gr.Dropdown(choices=choices, value=value), *show(value))

    everything = [table, concept, *shown]

    def on_row(event: gr.SelectData):
        concepts = state.workspace.concepts()
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        return gr.Dropdown(value=concepts[row].id) if 0 <= row < len(concepts) else gr.Dropdown()

    table.select(on_row, None, concept)

    @guarded
    def on_rename(concept_id: str | None, name: str):
        if not concept_id:
            raise gr.Error("pick a concept to rename")
        renamed = state.workspace.rename(concept_id, name)
        return (*refresh(concept_id), f"Renamed to **{html.escape(renamed.name)}**.", "")

    rename.click(on_rename, [concept, new_name], [*everything, status, new_name])

    @guarded
    def on_delete(concept_id: str | None):
        if not concept_id:
            raise gr.Error("pick a concept to delete")
        chosen = state.workspace.get(concept_id)
        text = f"Delete **{html.escape(chosen.name)}** with its adapter, training images and generated images? This cannot be undone."
        return gr.Row(visible=True), text

    delete.click(on_delete, concept, [confirm_row, confirm_text])
    cancel.click(lambda: gr.Row(visible=False), None, confirm_row)

    @guarded
    def on_confirm(concept_id: str | None):
        if not concept_id:
            raise gr.Error("pick a concept to delete")
        chosen = state.workspace.get(concept_id)
        job = state.jobs.snapshot()
        if chosen.status == TRAINING and job is not None and job.running and job.concept_id == concept_id:
            raise gr.Error(f"'{chosen.name}' is training right now; press Stop in the Train tab first")
        state.workspace.delete(concept_id)
        return (*refresh(None), f"Deleted **{html.escape(chosen.name)}**.")

    confirm.click(on_confirm, concept, [*everything, status])
    return {"refresh": (refresh, [concept], everything)}
