"""Train tab: upload concept images, pick a method and its options, and train in the background.

Callbacks stay thin: validation comes from `personalize.data`, the size estimate from the base
UNet, automatic masks from `personalize.automask`, the run from `personalize.train.train` (through
`app.jobs`); this module turns their results into components. Masks drawn on the accepted images stay
in the form (one per image, or None) until training starts, when the workspace writes them next to
the image copies as `<image>.mask.png`, the files the trainer reads.
"""

from __future__ import annotations

import dataclasses
import html
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from personalize import METHODS, get_method
from personalize.automask import auto_masks, load_segmenter
from personalize.data import load_image, many_images_note, validate_instance_images
from personalize.errors import UserError
from personalize.models import sample_steps_for
from personalize.prompts import check_template
from personalize.shapes import recipe
from personalize.shapes.world import CLASS_NOUN as SHAPES_CLASS_NOUN
from personalize.train import MIXED_PRECISION, TrainConfig, effective_config
from personalize.training.config import MASKS, OPTIMIZERS, PRIORS, PRODIGY_LR, SELECTION_RULES, default_of

from ..feedback import guarded, human_count, human_duration, human_size, message_of
from ..jobs import JobState
from ..options import COLUMNS, option_rows, parse_options
from ..state import AppState
from ..workspace import Concept, check_name
from .mask_editor import MASK_OPACITY, drawn_mask, editor_value, mask_choices, mask_status

POLL_SECONDS = 1.0  # how often the page asks the job for progress while one runs
TOKEN_VECTORS = 1  # the app's learned token: one vector, as diffusers' textual inversion example
PLOTTED = ("fidelity", "alignment", "drift")  # curves drawn and captioned (Vendi counts images: another scale)


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name)


def train_default(name: str) -> Any:
    """The default of a TrainConfig field (the trainer owns the defaults; the form shows them)."""
    return default_of(name)


def train_help(name: str) -> str | None:
    """The trainer's own one-line help of a TrainConfig field, shown under its input."""
    return _field(name).metadata.get("help")


def method_choices() -> list[tuple[str, str]]:
    return [(f"{name}: {get_method(name).description}", name) for name in METHODS]


def check_uploads(files: list[str] | None) -> tuple[list[str], list[str]]:
    """(accepted image paths, one message per rejected file) using the trainer's own validation."""
    accepted, rejected = [], []
    for path in files or []:
        try:
            accepted.extend(validate_instance_images([path]))
        except UserError as exc:  # name the file as the user knows it, not by its upload path
            rejected.append(str(exc).replace(str(path), Path(path).name))
    return accepted, rejected


def method_start(base_name: str, method: str, optimizer: str = "adamw") -> tuple[int, float, list[list[str]], str]:
    """(steps, learning rate, option rows, note) the form starts a method from: its tuned setting on `shapes`
    (`recipe.TUNED`, or the recipe's), else its paper defaults."""
    if base_name == "shapes" and optimizer != "prodigy":
        setting, settings = recipe.setting(method), recipe.train_settings(method)
        note = f"Setting on `shapes` ({html.escape(setting.describe())}): from {html.escape(setting.source)}"
        return settings["steps"], settings["lr"], option_rows(method, settings["method_options"]), note
    paper = get_method(method).train_defaults
    return paper.steps, default_lr(method, optimizer), option_rows(method), f"Paper defaults: {html.escape(paper.source)}"


def default_lr(method: str, optimizer: str) -> float:
    """The learning rate the form shows: the method's paper rate, or Prodigy's multiplier 1.0."""
    return PRODIGY_LR if optimizer == "prodigy" else get_method(method).train_defaults.lr


CAPTION_HEADERS = ("image", "caption")


def caption_rows(images: list[str]) -> pd.DataFrame:
    """One editable row per accepted image: its file name and an empty caption."""
    return pd.DataFrame([[Path(p).name, ""] for p in images], columns=list(CAPTION_HEADERS))


def image_captions(table: Any, count: int) -> list[str]:
    """The captions typed for the `count` accepted images, in upload order, each checked as a template."""
    rows = table.values.tolist() if isinstance(table, pd.DataFrame) else list(table or [])
    texts = [" ".join(str(row[1] if len(row) > 1 and row[1] is not None else "").split()) for row in rows[:count]]
    for row, text in zip(rows, texts):
        if text:
            check_template(f"caption of {row[0]}", text)
    return texts + [""] * (count - len(texts))


def upload_message(accepted: list[str], rejected: list[str]) -> str:
    lines = [f"{len(accepted)} image(s) accepted." if accepted else "No usable image yet."]
    if note := many_images_note(len(accepted)):
        lines.append(f"**Note:** {html.escape(note)}")
    if rejected:
        lines.append(f"**{len(rejected)} file(s) rejected:**")
        lines += [f"- {html.escape(line)}" for line in rejected]
    return "\n".join(lines)


def estimate_text(state: AppState, method: str, rows: Any, text_encoder: bool = False, token: bool = False) -> str:
    """Trainable parameters and adapter file size of the chosen method/options on the base model (with
    the text-encoder adapters and the learned token when switched on)."""
    try:
        count, size = state.base.estimate(method, parse_options(method, rows), bool(text_encoder), TOKEN_VECTORS if token else 0)
    except Exception as exc:  # shown next to the options: the user is editing them
        return f"Cannot size this adapter: {html.escape(message_of(exc))}"
    return f"**Trainable parameters:** {human_count(count)} · **Adapter file:** {human_size(size)} (on `{state.base.name}`)"


def phase_text(job: JobState) -> str:
    """What the job does now; a preparation stage with its count and ETA (e.g. 'generating class images 12/30, ETA 0:40')."""
    if not job.phase_total:
        return job.phase
    return f"{job.phase} {job.phase_done}/{job.phase_total}, ETA {human_duration(job.phase_eta)}"


def progress_html(job: JobState | None, now: float | None = None) -> str:
    """The progress line: before the first step the preparation stage (its bar, count, ETA and the time since
    the job started), then the steps (bar, loss, training time, ETA)."""
    if job is None:
        return ""
    parts = [f"<b>{html.escape(job.concept_name)}</b>"]
    if job.running and not job.total:  # before the trainer's on_start: loading, masks, class images, encoding
        fraction = job.phase_done / job.phase_total if job.phase_total else 0.0
        parts += [html.escape(phase_text(job)), f"elapsed {human_duration((now or time.time()) - job.started)}"]
    else:
        fraction = job.step / job.total if job.total else 0.0
        parts.append(f"step {job.step}/{job.total or '?'}")
        if job.loss is not None:
            parts.append(f"loss {job.loss:.4f}")
        parts.append(f"elapsed {human_duration(job.elapsed)}")
        if job.running:
            parts.append(f"ETA {human_duration(job.eta)}" if job.step else html.escape(phase_text(job)))
        else:
            parts.append(html.escape(job.status))
    return (
        f'<div class="pz-progress" data-status="{job.status}">'
        f'<div class="pz-bar"><div class="pz-fill" style="width:{100 * fraction:.1f}%"></div></div>'
        f'<div class="pz-progress-text">{" · ".join(parts)}</div></div>'
    )


def loss_frame(job: JobState | None) -> pd.DataFrame:
    points = job.losses if job else []
    return pd.DataFrame({"step": [p[0] for p in points], "loss": [p[1] for p in points]}).astype({"step": int, "loss": float})


def metrics_frame(job: JobState | None) -> pd.DataFrame | None:
    """The tracked curves in long form (step, metric, value) for one line per metric; None before the
    first scored validation (Gradio 6 draws no lines in a colour-split plot that once held an empty frame)."""
    rows = [(point["step"], name, point[name]) for point in (job.curves if job else []) for name in PLOTTED if name in point]
    if not rows:
        return None
    return pd.DataFrame(rows, columns=["step", "metric", "value"]).astype({"step": int, "value": float})


def sample_gallery(job: JobState | None) -> list[tuple[str, str]]:
    """Each validation grid, captioned with its step, its scores and the best-step mark."""
    if job is None:
        return []
    scores = {point["step"]: point for point in job.curves}
    gallery = []
    for path, caption in job.samples:
        step = int(caption.split()[-1])
        point = scores.get(step, {})
        numbers = ", ".join(f"{name} {point[name]:.2f}" for name in PLOTTED if name in point)
        mark = " · best" if step == job.best_step else (" · base model" if step == 0 else "")
        gallery.append((path, f"{caption}{mark}" + (f" · {numbers}" if numbers else "")))
    return gallery


def drawn_from(job: JobState | None) -> dict[str, tuple]:
    """What each plot and the gallery shows of `job`: the job, and how many points and grids."""
    if job is None:
        return {"loss": (), "metrics": (), "samples": ()}
    run = (job.concept_id, job.started)
    return {
        "loss": (*run, len(job.losses)),
        "metrics": (*run, len(job.curves)),
        "samples": (*run, len(job.samples), len(job.curves), job.best_step),
    }


def job_status(job: JobState | None) -> str:
    if job is None:
        return ""
    best = f" Best step so far: **{job.best_step}**." if job.best_step is not None else ""
    if job.running:
        return f"Training **{html.escape(job.concept_name)}**: {html.escape(phase_text(job))}.{best}"
    return html.escape(job.message) + best


def build(state: AppState) -> dict[str, Any]:
    default_method = train_default("method")
    # on `shapes` the form starts from the default method's setting there (prompt, prior, batch, loss weighting)
    shapes_start = recipe.train_settings(default_method) if state.base.name == "shapes" else {}
    start = lambda name: shapes_start.get(name, train_default(name))
    start_steps, start_lr, start_rows, start_note = method_start(state.base.name, default_method)
    with gr.Row():
        with gr.Column(scale=5):
            files = gr.File(label="Concept images", file_count="multiple", file_types=["image"], elem_id="train-files")
            upload_status = gr.Markdown("Upload 3-5 photos of your subject.", elem_id="train-upload-status")
            demo = gr.Button(
                "Use the demo concept (4 pictures of a pink heart, a shape this model never saw)",
                visible=state.base.name == "shapes",
                size="sm",
                elem_id="train-demo",
            )
            thumbs = gr.Gallery(label="Accepted images", columns=5, height=200, elem_id="train-thumbs", interactive=False)
            captions = gr.Dataframe(
                value=caption_rows([]),
                headers=list(CAPTION_HEADERS),
                datatype=["str", "str"],
                column_count=2,
                static_columns=[0],
                interactive=True,
                wrap=True,
                label="Captions (optional): a photo's own training prompt, e.g. 'a {token} {class_noun} asleep on a red sofa'; "
                "empty = the instance prompt",
                elem_id="train-captions",
            )
            accepted = gr.State([])
            masks = gr.State([])  # one mask (mode L, white = subject) or None per accepted image
            with gr.Accordion("Loss masks (optional): paint the subject, so the background teaches less", open=False):
                mask_pick = gr.Dropdown(
                    choices=[], value=None, label="Image", info="or click its thumbnail", interactive=True, elem_id="train-mask-image"
                )
                mask_editor = gr.ImageEditor(
                    label="Paint the subject white; the eraser takes paint away",
                    type="pil",
                    image_mode="RGBA",
                    sources=(),
                    transforms=(),
                    layers=False,
                    brush=gr.Brush(colors=[("#ffffff", MASK_OPACITY)], color_mode="fixed"),
                    format="png",
                    height=360,
                    placeholder="Pick an image",
                    elem_id="train-mask-editor",
                )
                with gr.Row():
                    save_mask = gr.Button("Save mask", size="sm", elem_id="train-mask-save")
                    clear_mask = gr.Button("Clear mask", size="sm", elem_id="train-mask-clear")
                    auto_mask = gr.Button("Auto masks", size="sm", elem_id="train-mask-auto")
                mask_info = gr.Markdown(mask_status([], []), elem_id="train-mask-status")
        with gr.Column(scale=6):
            name = gr.Textbox(label="Concept name", placeholder="e.g. my dog", elem_id="train-name")
            with gr.Row():
                token = gr.Textbox(label="Token", value=start("token"), info="rare word that stands for the subject", elem_id="train-token")
                class_noun = gr.Textbox(
                    label="Class noun",
                    value=start("class_noun"),
                    info="what the subject is: dog, person, mug",
                    elem_id="train-class",
                )
            method = gr.Dropdown(method_choices(), value=default_method, label="Method", elem_id="train-method")
            with gr.Row():
                steps = gr.Number(
                    label="Steps",
                    value=start_steps,
                    precision=0,
                    minimum=1,
                    info="empty = the method's paper default",
                    elem_id="train-steps",
                )
                lr = gr.Number(
                    label="Learning rate",
                    value=start_lr,
                    minimum=0,
                    step=1e-5,
                    info="empty = the method's paper default",
                    elem_id="train-lr",
                )
            defaults_note = gr.Markdown(start_note)
            options = gr.Dataframe(
                value=start_rows,
                headers=COLUMNS,
                datatype="str",
                interactive=True,
                label="Method options (edit the value column)",
                static_columns=[0, 2],
                elem_id="train-options",
            )
            prior = gr.Dropdown(
                list(PRIORS), value=start("prior"), label="Prior preservation", info=train_help("prior"), elem_id="train-prior"
            )
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    tracked = gr.Textbox(
                        label="Metrics tracked at each validation",
                        value=start("track_metrics"),
                        info=train_help("track_metrics"),
                        elem_id="train-track-metrics",
                    )
                    select_by = gr.Dropdown(
                        label="Keep the step chosen by",
                        choices=list(SELECTION_RULES),
                        value=start("select_by"),
                        info=train_help("select_by"),
                        elem_id="train-select-by",
                    )
                    drift_limit = gr.Number(
                        label="Drift limit",
                        value=start("drift_limit"),
                        minimum=0,
                        info=train_help("drift_limit"),
                        elem_id="train-drift-limit",
                    )
                with gr.Row():
                    class_images = gr.Number(
                        label="Class images",
                        value=start("class_images"),
                        precision=0,
                        minimum=1,
                        info=train_help("class_images"),
                        elem_id="train-class-images",
                    )
                    validation_every = gr.Number(
                        label="Validation images every (steps)",
                        value=start("validation_every"),
                        precision=0,
                        minimum=0,
                        info=train_help("validation_every"),
                        elem_id="train-validation",
                    )
                    sample_steps = gr.Number(
                        label="Sampling steps",
                        value=sample_steps_for(state.base.name),  # what the trainer picks for this model
                        precision=0,
                        minimum=1,
                        info=train_help("sample_steps"),
                        elem_id="train-sample-steps",
                    )
                with gr.Row():
                    resolution = gr.Number(
                        label="Resolution (px, 0 = native)",
                        value=start("resolution") or 0,
                        precision=0,
                        minimum=0,
                        step=64,
                        info=train_help("resolution"),
                        elem_id="train-resolution",
                    )
                    mixed_precision = gr.Dropdown(
                        list(MIXED_PRECISION),
                        value=start("mixed_precision"),
                        label="Mixed precision",
                        info=train_help("mixed_precision"),
                    )
                    seed = gr.Number(label="Seed", value=start("seed"), precision=0, info=train_help("seed"))
                with gr.Row():
                    instance_prompt = gr.Textbox(
                        label="Instance prompt",
                        value=start("instance_prompt"),
                        info=train_help("instance_prompt"),
                        elem_id="train-instance-prompt",
                    )
                    batch_size = gr.Number(
                        label="Batch size",
                        value=start("batch_size"),
                        precision=0,
                        minimum=1,
                        info=train_help("batch_size"),
                        elem_id="train-batch-size",
                    )
                    optimizer = gr.Dropdown(
                        list(OPTIMIZERS),
                        value=start("optimizer"),
                        label="Optimizer",
                        info=train_help("optimizer"),
                        elem_id="train-optimizer",
                    )
                with gr.Row():
                    masks_mode = gr.Dropdown(
                        list(MASKS), value=start("masks"), label="Masks", info=train_help("masks"), elem_id="train-masks-mode"
                    )
                    mask_model = gr.Textbox(
                        label="Mask model", value=state.base.mask_model, info=train_help("mask_model"), elem_id="train-mask-model"
                    )
                    mask_weight = gr.Number(
                        label="Mask background weight",
                        value=start("mask_background_weight"),
                        minimum=0,
                        maximum=1,
                        step=0.05,
                        info=train_help("mask_background_weight"),
                        elem_id="train-mask-weight",
                    )
                with gr.Row():
                    buckets = gr.Checkbox(
                        label="Aspect-ratio buckets", value=start("buckets"), info=train_help("buckets"), elem_id="train-buckets"
                    )
                    ema_decay = gr.Number(
                        label="EMA decay",
                        value=start("ema_decay"),
                        minimum=0,
                        maximum=0.9999,
                        step=0.001,
                        info=train_help("ema_decay"),
                        elem_id="train-ema-decay",
                    )
                    snr_gamma = gr.Number(
                        label="Min-SNR gamma (0 = off)",
                        value=start("snr_gamma") or 0,
                        minimum=0,
                        step=0.5,
                        info=train_help("snr_gamma"),
                        elem_id="train-snr-gamma",
                    )
                    keep_unconditional = gr.Number(
                        label="Keep unconditional (0 = off)",
                        value=start("keep_unconditional"),
                        minimum=0,
                        step=0.5,
                        info=train_help("keep_unconditional"),
                        elem_id="train-keep-unconditional",
                    )
            with gr.Row():
                text_encoder = gr.Checkbox(
                    label="Train the text encoder too",
                    value=start("train_text_encoder"),
                    info=train_help("train_text_encoder"),
                    elem_id="train-text-encoder",
                )
                learned_token = gr.Checkbox(
                    label="Learn the token (pivotal tuning)",
                    value=start("token_vectors") > 0,
                    info=f"the token becomes {TOKEN_VECTORS} new embedding vector, started from the class noun, trained with the adapter",
                    elem_id="train-token",
                )
            estimate = gr.Markdown(estimate_text(state, default_method, option_rows(default_method)), elem_id="train-estimate")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
    status = gr.Markdown(elem_id="train-status")
    progress = gr.HTML(elem_id="train-progress")
    with gr.Row():
        loss_plot = gr.LinePlot(loss_frame(None), x="step", y="loss", title="Training loss", height=260, elem_id="train-loss")
        metrics_plot = gr.LinePlot(
            metrics_frame(None),
            x="step",
            y="value",
            color="metric",
            title="Fidelity, alignment and drift at each validation (step 0 = base model)",
            height=260,
            elem_id="train-metrics",
        )
    samples = gr.Gallery(
        label="Validation images per step", columns=4, height=280, object_fit="contain", elem_id="train-samples", interactive=False
    )
    timer = gr.Timer(POLL_SECONDS, active=False)
    drawn = gr.State({})  # what the plots and the gallery were last drawn from (drawn_from)

    def fresh_masks(good: list[str]) -> tuple:
        """The mask editor's parts for newly accepted images: no masks yet, the first image picked."""
        empty = [None] * len(good)
        first = 0 if good else None
        return empty, gr.Dropdown(choices=mask_choices(good), value=first), editor_value(good, empty, first), mask_status(good, empty)

    mask_parts = [masks, mask_pick, mask_editor, mask_info]

    @guarded
    def on_upload(paths: list[str] | None):
        good, bad = check_uploads(paths)
        if bad:
            gr.Warning("Rejected: " + "; ".join(bad), duration=15)
        return good, good, upload_message(good, bad), caption_rows(good), *fresh_masks(good)

    files.change(on_upload, files, [accepted, thumbs, upload_status, captions, *mask_parts])

    @guarded
    def on_pick(images: list[str], current: list, index: int | None):
        return editor_value(images, current, index)

    mask_pick.input(on_pick, [accepted, masks, mask_pick], mask_editor)

    @guarded
    def on_thumb(images: list[str], current: list, event: gr.SelectData):
        return gr.Dropdown(value=event.index), editor_value(images, current, event.index)

    thumbs.select(on_thumb, [accepted, masks], [mask_pick, mask_editor])

    def picked(images: list[str], index: int | None) -> int:
        if index is None or not 0 <= index < len(images):
            raise UserError("no image picked: upload the concept images, then pick one under Loss masks")
        return index

    @guarded
    def on_save_mask(images: list[str], current: list, index: int | None, value: dict | None):
        index = picked(images, index)
        mask = drawn_mask(value, images[index])
        if mask is None:
            raise UserError(f"nothing is painted on {Path(images[index]).name}: paint the subject with the brush, then save")
        updated = [*current[:index], mask, *current[index + 1 :]]
        return updated, mask_status(images, updated)

    save_mask.click(on_save_mask, [accepted, masks, mask_pick, mask_editor], [masks, mask_info])

    @guarded
    def on_clear_mask(images: list[str], current: list, index: int | None):
        index = picked(images, index)
        updated = [*current[:index], None, *current[index + 1 :]]
        return updated, editor_value(images, updated, index), mask_status(images, updated)

    clear_mask.click(on_clear_mask, [accepted, masks, mask_pick], [masks, mask_editor, mask_info])

    @guarded
    def on_auto_masks(
        images: list[str],
        current: list,
        index: int | None,
        model_name: str,
        noun: str,
        progress=gr.Progress(),  # noqa: B008 (Gradio injects progress here)
    ):
        if not images:
            raise UserError("no usable concept images: upload 3-5 photos of the subject first")
        todo = [i for i, mask in enumerate(current) if mask is None]
        if not todo:
            gr.Info("Every image has a mask; clear one to make it again.")
            return current, gr.skip(), mask_status(images, current)
        prompt = " ".join(str(noun or "").split())
        if not prompt:
            raise UserError("the class noun is empty: auto masks look for it (e.g. dog, person, mug)")
        progress(0, desc="loading the segmentation model")
        segmenter = load_segmenter(str(model_name or "").strip() or state.base.mask_model)
        made = auto_masks(
            [load_image(images[i]) for i in todo],
            prompt,
            segmenter,
            progress=lambda done, total: progress((done, total), desc="masking", unit="images"),
        )
        updated = list(current)
        for i, mask in zip(todo, made):
            updated[i] = mask
        return updated, editor_value(images, updated, index), mask_status(images, updated)

    auto_mask.click(on_auto_masks, [accepted, masks, mask_pick, mask_model, class_noun], [masks, mask_editor, mask_info])

    @guarded
    def on_demo(chosen: str):
        good, bad = check_uploads([str(p) for p in recipe.demo_images(state.workspace.demo_dir)])
        demo = recipe.demo_setting(chosen)
        settings = demo.train_settings(chosen)
        origin = "its tuned setting on `shapes`" if chosen in recipe.TUNED else "the `shapes` recipe"
        note = (
            f"Demo concept: train, then generate `a {recipe.TOKEN} {SHAPES_CLASS_NOUN} on a teal background`. "
            f"Learning rate, batch size, loss weighting and instance prompt follow the method's setting ({origin}) at half "
            f"its steps and twice its rate: {settings['batch_size']} images per step at {demo.lr_factor:g}x the method's paper rate, "
            + (f"Min-SNR gamma {settings['snr_gamma']:g}" if settings["snr_gamma"] else "no Min-SNR weighting")
            + f", keep unconditional {settings['keep_unconditional']:g}"
            + "".join(f", {key} {value}" for key, value in demo.options.items())
            + f", {settings['steps']} steps; generate with guidance {recipe.GUIDANCE:g}."
        )
        return (
            good,
            good,
            upload_message(good, bad) + "\n\n" + note,
            caption_rows(good),
            *fresh_masks(good),
            recipe.DEMO_CONCEPT.replace("-", " "),
            settings["token"],
            settings["class_noun"],
            settings["steps"],
            settings["lr"],
            option_rows(chosen, settings["method_options"]),
            settings["prior"],
            settings["instance_prompt"],
            settings["batch_size"],
            "adamw",  # the recipe's learning rate is AdamW's
            settings["snr_gamma"],
            settings["keep_unconditional"],
        )

    demo.click(
        on_demo,
        method,
        [
            accepted,
            thumbs,
            upload_status,
            captions,
            *mask_parts,
            name,
            token,
            class_noun,
            steps,
            lr,
            options,
            prior,
            instance_prompt,
            batch_size,
            optimizer,
            snr_gamma,
            keep_unconditional,
        ],
    )

    @guarded
    def on_method(chosen: str, opt: str, te: bool, tok: bool):
        start_steps, start_lr, rows, note = method_start(state.base.name, chosen, opt)
        return start_steps, start_lr, rows, note, estimate_text(state, chosen, rows, te, tok)

    method.change(on_method, [method, optimizer, text_encoder, learned_token], [steps, lr, options, defaults_note, estimate])
    optimizer.change(default_lr, [method, optimizer], lr)  # Prodigy's lr is a multiplier: 1.0
    sizing = [method, options, text_encoder, learned_token]
    for control in (options, text_encoder, learned_token):
        control.input(lambda chosen, rows, te, tok: estimate_text(state, chosen, rows, te, tok), sizing, estimate)

    @guarded
    def on_start(
        images,
        concept_name,
        token_text,
        noun,
        chosen,
        n_steps,
        rate,
        rows,
        prior_mode,
        n_class,
        every,
        n_sample,
        size,
        precision,
        seed_value,
        prompt_template,
        n_batch,
        caption_table,
        opt,
        mask_mode,
        mask_model_name,
        background_weight,
        bucketed,
        decay,
        gamma,
        keep_uncond,
        metric_names,
        rule,
        limit,
        te,
        tok,
        drawn,
    ):
        if state.jobs.busy:
            job = state.jobs.snapshot()
            raise UserError(f"a training job is already running (concept '{job.concept_name}'); wait for it or press Stop")
        if not images:
            raise UserError("no usable concept images: upload 3-5 photos of the subject first")
        concept_name = check_name(concept_name)
        concept_id = state.workspace.new_id(concept_name)
        # the library's front door (as the CLI): empty steps / learning rate mean the method's paper defaults,
        # and every value is checked here, before anything is stored or the job starts
        config = effective_config(
            instance_images=str(state.workspace.images_dir(concept_id)),
            output_dir=str(state.workspace.train_dir(concept_id)),
            base_model=state.base.name,
            method=chosen,
            method_options=parse_options(chosen, rows),
            token=str(token_text).strip(),
            class_noun=str(noun).strip(),
            steps=n_steps,
            lr=rate,
            prior=prior_mode,
            class_images=n_class,
            validation_every=every,
            sample_steps=n_sample,
            resolution=size or None,
            mixed_precision=precision,
            seed=seed_value,
            instance_prompt=str(prompt_template).strip(),
            batch_size=n_batch,
            optimizer=opt,
            masks=mask_mode,
            mask_model=str(mask_model_name or "").strip() or state.base.mask_model,
            mask_background_weight=background_weight,
            buckets=bool(bucketed),
            ema_decay=decay,
            snr_gamma=gamma or None,
            keep_unconditional=keep_uncond or 0.0,
            track_metrics=str(metric_names).strip() or "none",
            select_by=rule,
            drift_limit=limit,
            train_text_encoder=bool(te),
            token_vectors=TOKEN_VECTORS if tok else 0,
            **state.base.validation_settings,
        )
        texts = image_captions(caption_table, len(images))
        concept = state.workspace.create(Concept.from_config(concept_id, concept_name, config), images, texts, drawn)
        try:
            state.jobs.start(concept, config)
        except Exception:
            state.workspace.delete(concept.id)
            raise
        job = state.jobs.snapshot()
        return job_status(job), progress_html(job), loss_frame(job), metrics_frame(job), [], gr.Timer(active=True)

    start.click(
        on_start,
        [
            accepted,
            name,
            token,
            class_noun,
            method,
            steps,
            lr,
            options,
            prior,
            class_images,
            validation_every,
            sample_steps,
            resolution,
            mixed_precision,
            seed,
            instance_prompt,
            batch_size,
            captions,
            optimizer,
            masks_mode,
            mask_model,
            mask_weight,
            buckets,
            ema_decay,
            snr_gamma,
            keep_unconditional,
            tracked,
            select_by,
            drift_limit,
            text_encoder,
            learned_token,
            masks,
        ],
        [status, progress, loss_plot, metrics_plot, samples, timer],
    )

    @guarded
    def on_stop():
        if not state.jobs.stop():
            gr.Info("No training job is running.")
        return job_status(state.jobs.snapshot())

    stop.click(on_stop, None, status)

    def job_views(shown: dict | None = None):
        """Status, progress, plots, gallery and timer of the current job, and what the plots and the
        gallery now show. A plot or the gallery is sent only when its data changed since `shown`: a
        redraw of both plots and every grid on each tick kept half a browser core busy during training."""
        job = state.jobs.snapshot()
        running = job is not None and job.running
        now = drawn_from(job)
        shown = shown or {}

        def view(name: str, make):
            return gr.skip() if shown.get(name) == now[name] else make(job)

        views = (view("loss", loss_frame), view("metrics", metrics_frame), view("samples", sample_gallery))
        return job_status(job), progress_html(job), *views, gr.Timer(active=running), now

    outputs = [status, progress, loss_plot, metrics_plot, samples, timer, drawn]
    timer.tick(job_views, drawn, outputs, show_progress="hidden")
    return {"refresh": (job_views, [], outputs)}
