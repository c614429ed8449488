"""Concepts tab: the library of learned concepts on disk; rename, delete (confirmed), download the adapter.

Under the selected concept: the saved step it generates with (final, best or a checkpoint; "Use this
step" switches), "Continue training" (a stopped, failed, interrupted or finished run resumes from its
latest checkpoint with more steps, through `TrainingJobs.continue_run`; the Train tab shows its
progress) and "Export as LoRA" (`app.exports`, the CLI's `personalize export`: a kohya or diffusers
file with its per-layer ranks and errors, how many layers were truncated, which tools read it and,
per learned token, what to write in each tool's prompt).
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from personalize.export import DEFAULT_DTYPE, DEFAULT_ENERGY, DEFAULT_FORMAT, DTYPES, FORMATS, READERS, ExportReport, prompt_words

from ..exports import export_adapter
from ..feedback import guarded, human_count, human_duration, human_size
from ..state import AppState
from ..workspace import TRAINING, AdapterInUse, Concept, SavedStep
from .common import concept_choices

TABLE_COLUMNS = ["name", "method", "base model", "steps", "created", "parameters", "file size", "status"]
EXPORT_COLUMNS = ["layer", "kind", "weight shape", "rank", "update rank", "full rank", "relative error"]
NO_RANK_LIMIT = 0  # the Rank box's "no limit" (an empty number box reaches callbacks as 0 or None)
NO_ENERGY = 0  # the Energy box left empty: the default choice of ranks


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


def concept_details(concept: Concept, in_use: AdapterInUse, result: dict[str, Any]) -> str:
    """The selected concept's record, the step it generates with, and the best step of its run."""
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
    if in_use.saved is not None:
        how = "chosen" if in_use.chosen else "default: the best validation step, else the final adapter"
        lines.append(f"- generates with: **{html.escape(in_use.saved.label)}** ({how})")
    if in_use.note:
        lines.append(f"- note: {html.escape(in_use.note)}")
    if result.get("best_step") is not None:
        scored = sum(1 for point in result.get("curves") or [] if point.get("step"))
        lines.append(f"- best validation step: {result['best_step']} (of {scored} scored validations, chosen by metric tracking)")
    return "\n".join(lines)


def step_choices(steps: list[SavedStep]) -> list[tuple[str, int]]:
    return [(saved.label, saved.step) for saved in steps]


def continue_default(concept: Concept, checkpoint: int | None) -> int | None:
    """The total the Continue box starts at: the run's configured steps, or twice them once they are reached."""
    if checkpoint is None:
        return None
    return concept.steps if concept.steps > checkpoint else checkpoint + concept.steps


def continue_info(concept: Concept, checkpoint: int | None) -> str:
    if checkpoint is None:
        return "No checkpoint saved yet: train it again in the Train tab."
    return (
        f"Resumes from the latest checkpoint, **step {checkpoint}** (of {concept.steps} configured), with the run's saved "
        "settings (`train/config.json`), exactly as `personalize train --config train/config.json --resume --steps N`. "
        "Afterwards the concept generates with the continued run's best (else final) step."
    )


def export_frame(report: ExportReport | None) -> pd.DataFrame:
    """One row per exported layer: its kind, weight shape, LoRA rank, its update's and its full rank, and relative error."""
    layers = report.layers if report is not None else []
    rows = [
        [layer.label, layer.kind, shape_text(layer.shape), layer.rank, layer.update_rank, layer.full_rank, f"{layer.error:.2e}"]
        for layer in layers
    ]
    return pd.DataFrame(rows, columns=EXPORT_COLUMNS)


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def export_summary(report: ExportReport, in_use: AdapterInUse) -> str:
    source = in_use.saved.label if in_use.saved else in_use.path.name
    lines = [
        f"Exported **{html.escape(report.output.name)}** from {html.escape(source)}: {report.format} format, {report.dtype}, "
        f"{len(report.layers)} layers, {report.num_params:,} parameters, **overall relative error {report.error:.2e}**, "
        f"file size **{human_size(report.file_size)}**."
    ]
    lines.append(f"- {html.escape(report.truncation(), quote=False)}")
    lines.append(f"- **{report.format} format: {html.escape(report.readers(), quote=False)}**")
    lines += [f"- not exported: `{html.escape(name)}` ({html.escape(reason)})" for name, reason in report.skipped.items()]
    for token, path in report.embeddings.items():
        words = {tool: code(word) for tool, word in prompt_words(token, path).items()}
        lines.append(
            f"- token {code(token)}: textual-inversion embedding {code(path.name)}; in the prompt write "
            f"{words['A1111']} in A1111 (file in `embeddings/`), {words['ComfyUI']} in ComfyUI (file in `models/embeddings/`), "
            f"{words['diffusers']} in diffusers (`pipe.load_textual_inversion(file, token=...)`)"
        )
    return "\n".join(lines)


def code(text: str) -> str:
    """`text` as a Markdown code span, shown as it is (`<sks>` included); a backtick in it becomes a quote."""
    return f"`{text.replace('`', chr(39))}`"


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
            with gr.Row():
                step = gr.Dropdown(
                    label="Saved step",
                    info="the adapter Generate, Download and Export use: final, best validation step or a checkpoint",
                    elem_id="concepts-step",
                    scale=3,
                )
                use_step = gr.Button("Use this step", elem_id="concepts-use-step", scale=1, interactive=False)
        with gr.Column(scale=2):
            preview = gr.Image(label="Latest validation images", type="filepath", interactive=False, height=240, elem_id="concepts-preview")
    with gr.Accordion("Continue training", open=False, elem_id="concepts-continue-section"):
        continue_note = gr.Markdown(elem_id="concepts-continue-info")
        with gr.Row(equal_height=True):
            total_steps = gr.Number(
                label="Total steps",
                precision=0,
                info="more than the checkpoint's step",
                elem_id="concepts-continue-steps",
                scale=3,
            )
            resume = gr.Button("Continue training", variant="primary", elem_id="concepts-continue", scale=1, interactive=False)
    with gr.Accordion("Export as LoRA", open=False, elem_id="concepts-export-section"):
        gr.Markdown(
            "A standard LoRA file of the step in use: each layer's update is factored (truncated SVD) at the smallest rank "
            "that keeps *Energy* of it, at most *Rank*. With both empty, a method of known rank (LoRA, LoHa, LoLDU, AOFT) is "
            f"written exactly, the others keep {DEFAULT_ENERGY}; the summary counts the layers truncated. "
            + " ".join(f"**{name}** loads in {readers}." for name, readers in READERS.items())
            + " Learned tokens come as textual-inversion files named for the word to write in the prompt."
        )
        with gr.Row():
            export_format = gr.Radio(
                list(FORMATS),
                value=DEFAULT_FORMAT,
                label="Format",
                info="kohya: A1111, ComfyUI and diffusers; diffusers: diffusers and ComfyUI, not A1111",
                elem_id="concepts-export-format",
            )
            export_dtype = gr.Dropdown(list(DTYPES), value=DEFAULT_DTYPE, label="Dtype", elem_id="concepts-export-dtype")
        with gr.Row():
            export_rank = gr.Number(
                label="Rank",
                value=NO_RANK_LIMIT,
                precision=0,
                info=f"largest LoRA rank per layer; {NO_RANK_LIMIT} or empty = no limit",
                elem_id="concepts-export-rank",
            )
            export_energy = gr.Number(
                label="Energy",
                value=None,
                step=0.01,
                info=f"share of each layer's squared norm to keep, in (0, 1]; empty: a method of known rank exactly, else {DEFAULT_ENERGY}",
                elem_id="concepts-export-energy",
            )
        export = gr.Button("Export", variant="primary", elem_id="concepts-export", interactive=False)
        export_note = gr.Markdown(elem_id="concepts-export-summary")
        export_table = gr.Dataframe(
            export_frame(None),
            headers=EXPORT_COLUMNS,
            interactive=False,
            label="Per-layer rank and relative error",
            visible=False,
            max_height=320,
            elem_id="concepts-export-table",
        )
        export_download = gr.DownloadButton("Download LoRA", visible=False, elem_id="concepts-export-download")
        export_embeddings = gr.File(
            label="Learned tokens as textual-inversion embeddings (load them with the LoRA)",
            file_count="multiple",
            interactive=False,
            visible=False,
            elem_id="concepts-export-embeddings",
        )
    status = gr.Markdown(elem_id="concepts-status")

    def show(concept_id: str | None):
        """Details, preview, download, delete, saved steps, continue and export state of the selected concept."""
        cleared_export = ("", gr.Dataframe(visible=False), gr.DownloadButton(value=None, visible=False), gr.File(value=None, visible=False))
        if not concept_id:
            return (
                "",
                None,
                gr.DownloadButton(value=None, interactive=False),
                gr.Button(interactive=False),
                gr.Row(visible=False),
                gr.Dropdown(choices=[], value=None),
                gr.Button(interactive=False),
                "",
                None,
                gr.Button(interactive=False),
                gr.Button(interactive=False),
                *cleared_export,
            )
        chosen = state.workspace.get(concept_id)
        in_use = state.workspace.adapter_in_use(concept_id)
        steps = state.workspace.saved_steps(concept_id)
        checkpoint = state.workspace.latest_checkpoint(concept_id)
        preview_path = state.workspace.preview_image(concept_id)
        has_adapter = in_use.path.is_file() and chosen.usable
        return (
            concept_details(chosen, in_use, state.workspace.run_result(concept_id)),
            str(preview_path) if preview_path else None,
            gr.DownloadButton(value=str(in_use.path) if has_adapter else None, interactive=has_adapter),
            gr.Button(interactive=True),
            gr.Row(visible=False),
            gr.Dropdown(choices=step_choices(steps), value=in_use.saved.step if in_use.saved else None),
            gr.Button(interactive=bool(steps) and chosen.usable),
            continue_info(chosen, checkpoint),
            continue_default(chosen, checkpoint),
            gr.Button(interactive=checkpoint is not None),
            gr.Button(interactive=has_adapter),
            *cleared_export,
        )

    shown = [
        details,
        preview,
        download,
        delete,
        confirm_row,
        step,
        use_step,
        continue_note,
        total_steps,
        resume,
        export,
        export_note,
        export_table,
        export_download,
        export_embeddings,
    ]
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

    def picked(concept_id: str | None, what: str) -> Concept:
        if not concept_id:
            raise gr.Error(f"pick a concept to {what}")
        return state.workspace.get(concept_id)

    @guarded
    def on_rename(concept_id: str | None, name: str):
        picked(concept_id, "rename")
        renamed = state.workspace.rename(concept_id, name)
        return (*refresh(concept_id), f"Renamed to **{html.escape(renamed.name)}**.", "")

    rename.click(on_rename, [concept, new_name], [*everything, status, new_name])

    @guarded
    def on_use_step(concept_id: str | None, saved_step: int | None):
        chosen = picked(concept_id, "switch steps")
        if saved_step is None:
            raise gr.Error("pick a saved step first")
        saved = state.workspace.choose_step(chosen.id, saved_step)
        return (*refresh(concept_id), f"**{html.escape(chosen.name)}** now generates with {html.escape(saved.label)}.")

    use_step.click(on_use_step, [concept, step], [*everything, status])

    @guarded
    def on_continue(concept_id: str | None, steps: int | None):
        chosen = picked(concept_id, "continue")
        checkpoint = state.workspace.latest_checkpoint(chosen.id)
        state.jobs.continue_run(chosen.id, steps)
        return (
            *refresh(concept_id),
            f"Continuing **{html.escape(chosen.name)}** from step {checkpoint} to {steps}: the Train tab shows its progress.",
        )

    resume.click(on_continue, [concept, total_steps], [*everything, status])

    @guarded
    def on_export(
        concept_id: str | None,
        format: str,
        rank: int | None,
        energy: float | None,
        dtype: str,
        progress=gr.Progress(),  # noqa: B008 (Gradio injects progress here)
    ):
        chosen = picked(concept_id, "export")
        if not chosen.usable:
            raise gr.Error(f"concept '{chosen.name}' has no trained adapter to export (status: {chosen.status})")
        in_use = state.workspace.adapter_in_use(chosen.id)
        output = state.workspace.new_export_path(chosen.id, format, in_use.saved.step if in_use.saved else None)
        progress(0, desc="waiting for the base model" if state.base.lock.locked() else "exporting")
        report = export_adapter(
            state.base,
            in_use.path,
            format,
            output,
            None if rank in (None, NO_RANK_LIMIT) else rank,
            None if energy in (None, NO_ENERGY) else energy,
            dtype,
            on_layer=lambda done, total, name: progress((done, total), desc="exporting", unit="layers"),
        )
        return (
            export_summary(report, in_use),
            gr.Dataframe(export_frame(report), visible=True),
            gr.DownloadButton(value=str(report.output), visible=True),
            gr.File(value=[str(path) for path in report.embeddings.values()] or None, visible=bool(report.embeddings)),
        )

    export_inputs = [concept, export_format, export_rank, export_energy, export_dtype]
    export.click(on_export, export_inputs, [export_note, export_table, export_download, export_embeddings])

    @guarded
    def on_delete(concept_id: str | None):
        chosen = picked(concept_id, "delete")
        text = f"Delete **{html.escape(chosen.name)}** with its adapter, training images and generated images? This cannot be undone."
        return gr.Row(visible=True), text

    delete.click(on_delete, concept, [confirm_row, confirm_text])
    cancel.click(lambda: gr.Row(visible=False), None, confirm_row)

    @guarded
    def on_confirm(concept_id: str | None):
        chosen = picked(concept_id, "delete")
        job = state.jobs.snapshot()
        if chosen.status == TRAINING and job is not None and job.running and job.concept_id == concept_id:
            raise gr.Error(f"'{chosen.name}' is training right now; press Stop in the Train tab first")
        state.workspace.delete(concept_id)
        return (*refresh(None), f"Deleted **{html.escape(chosen.name)}**.")

    confirm.click(on_confirm, concept, [*everything, status])
    return {"refresh": (refresh, [concept], everything)}
