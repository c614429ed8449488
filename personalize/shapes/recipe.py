"""How to personalise the built-in `shapes` model: the recipe (one training setting chosen once for
this model size) and, per method, the setting a sweep chose (`TUNED`). Used by `personalize bench
--quality`, the app's demo concept and (at half its steps, twice its rate) the learning test.

The methods' default learning rates come from their papers, for SD's 860M-parameter UNet at 512 px
and hundreds of steps. On this 1.5M-parameter UNet at 32 px, `STEPS` steps of `BATCH_SIZE` images at
`LR_FACTOR` times that rate with Min-SNR loss weighting, without prior preservation, gave the best
concept fidelity of the settings tried for LoRA (BENCHMARKS.md, "Quality on `shapes`", lists them).
Every method also keeps the empty prompt's prediction at the frozen model's (`KEEP_UNCONDITIONAL`, issue 29),
without which classifier-free guidance cancelled what adapters learned of subjects the model can draw.

A method's setting on this model is a `Tuned`: learning-rate factor, steps, method options and other
`TrainConfig` fields, with its `source` (the command or measurement that chose it). `TUNED` holds the
measured ones (`personalize bench --quality --sweep ...` prints an entry for each winner);
`train_settings(method)` starts from the method's entry and, for a method without one, from the
recipe. `paper_settings(method)` is the method's paper default (its own learning rate and options) at
the recipe's steps: the quality tables' "paper default" rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import get_method
from . import world as W

STEPS = 300
BATCH_SIZE = 4  # all 4 instance images in every step: less gradient noise at no cost at 32 px
LR_FACTOR = 20.0
SNR_GAMMA = 5.0  # Min-SNR weighting (Hang et al. 2023's gamma): on LoRA, pink heart 0.67 -> 0.92 fidelity at 300 steps
# Issue 29: trained on one fixed prompt, UNet adapters stored a subject in prompt-independent weights, which
# classifier-free guidance cancels (LoRA on the red striped star: the empty prompt drew it in 7 of 12 images, the
# prompted fidelity at guidance 5 was 0.00). Keeping the empty prompt's prediction at the frozen model's moved the
# update into the cross-attention keys and lifted LoRA to 0.50 / 0.58 / 0.67 on the three tuning subjects (was
# 0.00 / 0.08 / 0.33); BENCHMARKS.md, "Subjects the model can draw".
KEEP_UNCONDITIONAL = 1.0
GUIDANCE = 5.0  # classifier-free guidance for this model: 7.5 washes its colours out towards white
TOKEN = "sks"
INSTANCE_PROMPT = "a {token} {class_noun}"  # the captions' own form ("a red star ..."), not SD's "a photo of"
# Validation prompts in the captions' language, on backgrounds no instance image shows, so the tracked
# alignment (the share of prompted attributes the judge sees) measures whether the token took the background.
VALIDATION_PROMPTS = [f"a {{token}} {{class_noun}} on a {background} background" for background in W.UNSEEN_BACKGROUNDS]
# The app's demo and the learning test train half the method's steps at twice its rate, so a newcomer waits half
# as long: LoRA (at its tuned setting, with keep_unconditional) recognised on the demo concept in 9 of 12 images
# of the learning test (11 of 12 before keep_unconditional), and on the evaluation subject purple-solid-ring in 12 of 12.
DEMO_SPEEDUP = 2
DEMO_CONCEPT = "pink-heart"  # the concept the app offers as a demo (4 images also in examples/shapes-pink-heart)


@dataclass(frozen=True)
class Tuned:
    """One method's training setting on `shapes`: `lr_factor` times its paper learning rate, `steps`,
    method `options` (on top of its defaults), `overrides` of other TrainConfig fields (on top of the
    recipe's), and `source`: the command or measurement that chose it."""

    lr_factor: float = LR_FACTOR
    steps: int = STEPS
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    source: str = "the recipe (no tuned setting)"

    def train_settings(self, method: str) -> dict[str, Any]:
        """This setting of `method` as TrainConfig fields (add instance_images, output_dir and any others)."""
        return (
            dict(
                base_model="shapes",
                method=method,
                method_options=dict(self.options),
                snr_gamma=SNR_GAMMA,
                keep_unconditional=KEEP_UNCONDITIONAL,
                token=TOKEN,
                class_noun=W.CLASS_NOUN,
                instance_prompt=INSTANCE_PROMPT,
                captions=False,  # one instance prompt (the bench's instance folders hold captions naming the background)
                steps=self.steps,
                batch_size=BATCH_SIZE,
                lr=learning_rate(method, self.lr_factor),
                prior="none",
                validation_prompts=list(VALIDATION_PROMPTS),
                validation_guidance=GUIDANCE,
            )
            | self.overrides
        )

    def describe(self) -> str:
        """In a table cell: '20x lr, 300 steps, preset=attention_convs'."""
        extra = {**self.options, **self.overrides}
        return ", ".join([f"{self.lr_factor:g}x lr", f"{self.steps} steps", *(f"{k}={value_text(v)}" for k, v in extra.items())])

    def entry(self, method: str) -> str:
        """This setting as an entry of `TUNED` (Python source)."""
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{method!r}: Tuned({fields}),"


def value_text(value: Any) -> str:
    """A setting's value as a user types it: none, true, 20, 0.5, attention_convs."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return format(value, "g") if isinstance(value, float) else str(value)


RECIPE = Tuned()  # the setting of a method without a tuned one
PAPER = Tuned(lr_factor=1.0, source="the method's paper defaults (its own learning rate and options) at the recipe's steps")
# Per method, the measured setting; `personalize bench --quality --sweep` prints an entry for each winner.
TUNED: dict[str, Tuned] = {
    # LoRA's default targets (the attention projections) learn a concept's colour but draw a shape the model
    # already knows; with the 3x3 convs as well it draws the new outline.
    "lora": Tuned(
        lr_factor=20.0,
        steps=300,
        options={"preset": "attention_convs"},
        source="BENCHMARKS.md, 'Quality on `shapes`': the recipe on the second model (LoRA targets, steps, lr and Min-SNR tried)",
    ),
}


def learning_rate(method: str, factor: float = LR_FACTOR) -> float:
    """`method`'s paper learning rate times `factor`."""
    return get_method(method).train_defaults.lr * factor


def setting(method: str) -> Tuned:
    """`method`'s tuned setting, or the recipe's where it has none."""
    return TUNED.get(method, RECIPE)


def train_settings(method: str) -> dict[str, Any]:
    """`method`'s tuned setting (or the recipe's) as TrainConfig fields."""
    return setting(method).train_settings(method)


def paper_settings(method: str) -> dict[str, Any]:
    """`method`'s paper default as TrainConfig fields: its own learning rate and options, the recipe's steps."""
    return PAPER.train_settings(method)


def demo_setting(method: str) -> Tuned:
    """The demo's setting (the app's demo button and the learning test): the method's setting at
    1/`DEMO_SPEEDUP` of its steps and `DEMO_SPEEDUP` times its rate."""
    tuned = setting(method)
    return dataclasses.replace(tuned, lr_factor=tuned.lr_factor * DEMO_SPEEDUP, steps=tuned.steps // DEMO_SPEEDUP)


def demo_settings(method: str) -> dict[str, Any]:
    """The demo's TrainConfig fields."""
    return demo_setting(method).train_settings(method)


def demo_images(folder: str | Path) -> list[Path]:
    """Write the demo concept's 4 instance images into `folder` and return their paths."""
    return W.write_instance_images(W.concept_by_name(DEMO_CONCEPT), folder)
