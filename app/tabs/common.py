"""Pieces several tabs share: the concept pickers and their refresh."""

from __future__ import annotations

import gradio as gr

from ..workspace import Workspace

NO_CONCEPT = ""  # the "(none)" choice: the base model alone


def concept_choices(workspace: Workspace, usable_only: bool = True) -> list[tuple[str, str]]:
    """(label, id) for each concept, newest first; by default only those with a trained adapter."""
    concepts = [c for c in workspace.concepts() if c.usable or not usable_only]
    return [(f"{c.name} ({c.method}, {c.status})", c.id) for c in concepts]


def refreshed_picker(workspace: Workspace, current: str | None, allow_none: bool) -> tuple[gr.Dropdown, str | None]:
    """The picker with fresh choices, keeping the selection while it exists, else the newest concept;
    also returns the selected value (an update object does not expose it)."""
    choices = concept_choices(workspace)
    ids = [value for _, value in choices]
    if allow_none:
        choices = [("(none: base model only)", NO_CONCEPT), *choices]
    if current is not None and current in [value for _, value in choices]:
        value = current
    else:
        value = ids[0] if ids else (NO_CONCEPT if allow_none else None)
    return gr.Dropdown(choices=choices, value=value), value
