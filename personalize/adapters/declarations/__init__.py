"""What each adapter method declares, importable without torch: its options (a config dataclass with
paper defaults), target presets, training defaults, one-line description and notes.

One module here per method module of `personalize.adapters` (same name); each `declare`s its methods.
A method class takes these attributes from its `declaration` when it is registered (`base.register`),
so they have one home, and `personalize methods` lists them without loading torch (`declarations()`).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError

# Attention projections of every diffusers transformer block: self (attn1) and cross (attn2) attention.
ATTENTION = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
# Transformer-block input/output projections (Conv2d 1x1 in SD 1.x, Linear in SD 2.x / SDXL).
PROJECTIONS = r"attentions\.\d+\.(proj_in|proj_out)$"
# Feed-forward linears of transformer blocks (GEGLU input projection and output).
FEED_FORWARD = r"ff\.net\.(0\.proj|2)$"
# 3x3 convs of the UNet's ResNet blocks and resamplers (every diffusers UNet2DConditionModel).
CONVS = r"(resnets\.\d+\.conv[12]|(down|up)samplers\.\d+\.conv)$"


def join_patterns(*patterns: str) -> str:
    return "|".join(f"(?:{p})" for p in patterns)


@dataclass
class AdapterConfig:
    """Options every method shares. Subclasses add method options with paper defaults."""

    preset: str = ""  # name of a target preset of the method; "" = the method's default preset
    targets: str | None = None  # regular expression over module names; overrides the preset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainDefaults:
    """Per-method training defaults taken from the papers (documented in README's table)."""

    lr: float
    steps: int
    source: str  # where the values come from


@dataclass(frozen=True)
class Declaration:
    """A method as users choose it: name, options and defaults (the `Method` class adds the maths)."""

    name: str
    description: str  # one line, shown in the CLI and the app
    config_cls: type[AdapterConfig]
    train_defaults: TrainDefaults
    presets: dict[str, str] = field(default_factory=lambda: {"attention": ATTENTION})  # name -> target pattern
    default_preset: str = "attention"
    notes: tuple[str, ...] = ()  # caveats a user must know before choosing options (shown by `personalize methods`)


DECLARED: dict[str, Declaration] = {}


def declare(declaration: Declaration) -> Declaration:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", declaration.name):
        raise ValueError(f"bad method name {declaration.name!r}")
    DECLARED[declaration.name] = declaration
    return declaration


def declarations() -> dict[str, Declaration]:
    """Every method's declaration by name, in name order (imports each module of this package once)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(DECLARED.items()))


def declaration(name: str) -> Declaration:
    """The declaration of method `name`; a UserError naming the accepted ones if there is none."""
    known = declarations()
    if name not in known:
        raise UserError(f"unknown method '{name}'; accepted: {', '.join(known)}")
    return known[name]
