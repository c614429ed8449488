"""The app's page: a banner, then the Train, Generate, Evaluate and Concepts tabs over one AppState."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from .state import AppState
from .tabs import concepts, evaluate, generate, train

TITLE = "personalize"
CSS_PATH = Path(__file__).with_name("style.css")


def banner(state: AppState) -> str:
    base = state.base
    if base.fallback_reason:
        return (
            f'<div class="pz-banner pz-warning"><b>The base model <code>{html.escape(base.requested)}</code> could not be '
            f"loaded, so the app runs the built-in offline model <code>{html.escape(base.name)}</code></b> "
            f"({html.escape(base.description)})."
            f'<div class="pz-reason">Reason: {html.escape(base.fallback_reason)}</div></div>'
        )
    return (
        f'<div class="pz-banner">Base model <code>{html.escape(state.base.name)}</code> · '
        f"workspace <code>{html.escape(str(state.workspace.root))}</code></div>"
    )


def build_app(state: AppState) -> gr.Blocks:
    """The Blocks of the whole app; launch it with `launch_options(state)`."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown("# personalize\nTeach Stable Diffusion a subject from 3-5 photos, generate with it, measure it.")
        gr.HTML(banner(state), elem_id="banner")
        with gr.Tabs():
            with gr.Tab("Train", id="train") as train_tab:
                train_parts = train.build(state)
            with gr.Tab("Generate", id="generate") as generate_tab:
                generate_parts = generate.build(state)
            with gr.Tab("Evaluate", id="evaluate") as evaluate_tab:
                evaluate_parts = evaluate.build(state)
            with gr.Tab("Concepts", id="concepts") as concepts_tab:
                concepts_parts = concepts.build(state)
        tabs = [(train_tab, train_parts), (generate_tab, generate_parts), (evaluate_tab, evaluate_parts), (concepts_tab, concepts_parts)]
        for tab, parts in tabs:
            function, inputs, outputs = parts["refresh"]
            tab.select(function, inputs, outputs)  # each tab shows the workspace as it is now
            demo.load(function, inputs, outputs)
    return demo


def launch_options(state: AppState) -> dict:
    """Keyword arguments for `Blocks.launch`: styling, and the workspace as a folder files may come from."""
    return {"allowed_paths": [str(state.workspace.root)], "css_paths": [CSS_PATH]}
