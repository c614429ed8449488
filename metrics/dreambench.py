"""The DreamBench protocol data (DreamBooth paper): subjects, class nouns and the 25 prompt templates."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def load_dreambench() -> dict:
    """The parsed metrics/data/dreambench.json (subjects, live_subjects, object_prompts, live_prompts)."""
    return json.loads(resources.files("metrics").joinpath("data/dreambench.json").read_text(encoding="utf-8"))


def dreambench_prompts(subject: str, token: str) -> list[str]:
    """The 25 evaluation prompts of a DreamBench subject with `token` as its identifier ("a sks dog ...")."""
    data = load_dreambench()
    if subject not in data["subjects"]:
        raise ValueError(f"unknown DreamBench subject {subject!r}; accepted: {', '.join(data['subjects'])}")
    templates = data["live_prompts"] if subject in data["live_subjects"] else data["object_prompts"]
    return [template.format(token, data["subjects"][subject]) for template in templates]
