"""Prompt clean-up for CLIP-T: remove placeholder tokens (e.g. "sks") that CLIP's text tower never learned."""

from __future__ import annotations

import re
from typing import Iterable


def strip_placeholders(prompt: str, tokens: Iterable[str]) -> str:
    """`prompt` without each token as a whole word, whitespace tidied: "a sks dog" -> "a dog"."""
    for token in sorted({t for t in tokens if t}, key=len, reverse=True):
        prompt = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt)
    return re.sub(r" ([,.;:!?])", r"\1", " ".join(prompt.split()))
