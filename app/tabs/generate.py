"""Generate tab: prompt the base model with a trained concept (or none) at a chosen strength.

One click = one `personalize.generate.generate` call on the shared base pipeline; images and their
manifest.jsonl go into a fresh folder of the concept (the Evaluate tab reads it). With comparison
on, the same seeds are also rendered without the adapter.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from personalize.atomic import remove_empty_dirs
from personalize.generate import AdapterSpec, generate

from ..feedback import guarded
from ..state import AppState
from .common import refreshed_picker

MAX_IMAGES = 8


def build(state: AppState) -> dict[str, Any]:
    with gr.Row():
        concept = gr.Dropdown(label="Concept", elem_id="gen-concept", scale=3)
        strength = gr.Slider(
            0.0, 2.0, value=1.0, step=0.05, label="Strength", info="adapter scale; 0 = the base model", elem_id="gen-strength", scale=2
        )
    prompt = gr.Textbox(label="Prompt", placeholder="a photo of sks dog on the beach", elem_id="gen-prompt")
    negative = gr.Textbox(label="Negative prompt", placeholder="blurry, low quality", elem_id="gen-negative")
    with gr.Row():
        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="gen-seed")
        steps = gr.Slider(1, 150, value=30, step=1, label="Steps", elem_id="gen-steps")
        guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.5, label="Guidance", elem_id="gen-guidance")
        count = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Number of images", elem_id="gen-count")
    compare = gr.Checkbox(label="Compare with and without the adapter (same seeds)", value=True, elem_id="gen-compare")
    button = gr.Button("Generate", variant="primary", elem_id="gen-button")
    status = gr.Markdown(elem_id="gen-status")
    with gr.Row():
        gallery = gr.Gallery(label="Generated images", columns=4, height=320, elem_id="gen-gallery", interactive=False)
        baseline = gr.Gallery(label="Without the adapter (same seeds)", columns=4, height=320, elem_id="gen-baseline", interactive=False)

    @guarded
    def on_concept(concept_id: str | None, current_prompt: str):
        if not concept_id:
            return current_prompt
        chosen = state.workspace.get(concept_id)
        return current_prompt if current_prompt and chosen.token in current_prompt.split() else chosen.prompt

    concept.change(on_concept, [concept, prompt], prompt)

    compare.change(lambda on: gr.Gallery(visible=on), compare, baseline)

    @guarded
    def on_generate(
        concept_id,
        text,
        negative_text,
        seed_value,
        n_steps,
        scale,
        guidance_value,
        n_images,
        with_baseline,
        progress=gr.Progress(),  # noqa: B008 (Gradio injects progress here)
    ):
        if not str(text or "").strip():
            raise gr.Error("the prompt is empty; describe the image, e.g. 'a photo of sks dog on the beach'")
        adapters, subject = [], None
        if concept_id:
            chosen = state.workspace.get(concept_id)
            if not chosen.usable:
                raise gr.Error(f"concept '{chosen.name}' has no trained adapter yet (status: {chosen.status})")
            adapters, subject = [AdapterSpec(str(state.workspace.adapter_path(concept_id)), float(scale))], chosen.name
        out = state.workspace.new_generation_dir(concept_id or None)
        progress(0, desc="waiting for the base model" if state.base.lock.locked() else "generating")
        with state.base.lock:
            try:
                images = generate(
                    state.base.pipe,
                    [text],
                    adapters=adapters,
                    negative_prompt=negative_text or "",
                    num_images=int(n_images),
                    seed=int(seed_value),
                    steps=int(n_steps),
                    guidance=float(guidance_value),
                    output_dir=str(out),
                    compare=bool(with_baseline and adapters),
                    subject=subject,
                    progress=lambda done, total: progress((done, total), desc="generating", unit="images"),
                )
            except BaseException:
                remove_empty_dirs([out])  # a failed click leaves no empty run folder
                raise
        made = [(im.path, f"seed {im.seed}") for im in images]
        base = [(im.baseline_path, f"seed {im.seed}, no adapter") for im in images if im.baseline_path]
        where = out.relative_to(state.workspace.root)
        return made, base, f"{len(made)} image(s) saved in `{where}` (workspace {state.workspace.root})."

    button.click(
        on_generate,
        [concept, prompt, negative, seed, steps, strength, guidance, count, compare],
        [gallery, baseline, status],
    )

    def refresh(current: str | None):
        return refreshed_picker(state.workspace, current, allow_none=True)[0]

    return {"refresh": (refresh, [concept], [concept])}
