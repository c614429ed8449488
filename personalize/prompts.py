"""Prompt templates and seeds as users give them, checked where they enter (CLI, app, config).

A template may name the placeholders `{token}` and `{class_noun}` (DreamBooth's identifier and
class); any other `{name}` is refused with the accepted ones rather than rendered literally. Seeds
are integers from 0 to `MAX_SEED`: accelerate's `set_seed` also seeds numpy, whose seeds are 32-bit,
and one range for training and generation keeps a seed usable in both.
"""

from __future__ import annotations

import re
import string

from .errors import UserError

PLACEHOLDERS = ("token", "class_noun")
MAX_SEED = 2**32 - 1
_FIELD = re.compile(r"(?<!\{)\{([^{}]*)\}(?!\})")  # a single-braced {name}


def check_template(name: str, template: str) -> str:
    """`template` if every placeholder is known and the braces are balanced; else a UserError naming `name`."""
    accepted = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    unknown = [field for field in _FIELD.findall(template) if field not in PLACEHOLDERS]
    if unknown:
        raise UserError(f"{name} '{template}' has an unknown placeholder {{{unknown[0]}}}; accepted: {accepted}")
    try:
        list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UserError(
            f"{name} '{template}' has an unmatched brace ({exc}); placeholders are {accepted}, "
            "and a literal brace is written twice: {{ }}"
        ) from exc
    return template


def check_seed(seed: int, count: int = 1, name: str = "seed") -> int:
    """`seed` if `seed, seed + 1, ..., seed + count - 1` all lie in 0..MAX_SEED; else a UserError."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{name} must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    if not 0 <= seed <= MAX_SEED - max(count - 1, 0):
        upper = MAX_SEED - max(count - 1, 0)
        extra = f" (the {count} images use seeds {name}, {name}+1, ...)" if count > 1 else ""
        raise UserError(f"{name} must be an integer from 0 to {upper}{extra}, got {seed}")
    return seed


def check_generation(prompts: list[str], seed: int, num_images: int) -> None:
    """The prompts and seed range of one generation call (image j of a prompt uses `seed + j`)."""
    for prompt in prompts:
        check_template("prompt", prompt)
    check_seed(seed, max(num_images, 1))
