"""How to personalise the built-in `shapes` model: one training recipe, chosen once for this model
size, used by `personalize bench --quality`, the app's demo concept and (at half its steps, twice its rate) the learning test.

The methods' default learning rates come from their papers, for SD's 860M-parameter UNet at 512 px
and hundreds of steps. On this 1.5M-parameter UNet at 32 px, `STEPS` steps of `BATCH_SIZE` images at
`LR_FACTOR` times that rate with Min-SNR loss weighting, without prior preservation, gave the best
concept fidelity of the settings tried for LoRA (BENCHMARKS.md, "Quality on `shapes`", lists them).
LoRA additionally trains the UNet's 3x3 convs (`RECOMMENDED_OPTIONS`): on its default targets, the
attention projections, it learns a concept's colour but draws a shape the model already knows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapters import get_method
from . import world as W

STEPS = 300
BATCH_SIZE = 4  # all 4 instance images in every step: less gradient noise at no cost at 32 px
LR_FACTOR = 20.0
SNR_GAMMA = 5.0  # Min-SNR weighting (Hang et al. 2023's gamma): on LoRA, pink heart 0.67 -> 0.92 fidelity at 300 steps
# Options the recipe adds to a method's defaults on this model (the demo and the learning test use them;
# `bench --quality` measures them beside every method's defaults as `QUALITY_VARIANTS`).
RECOMMENDED_OPTIONS: dict[str, dict[str, Any]] = {"lora": {"preset": "attention_convs"}}
QUALITY_VARIANTS = tuple(f"{m}:" + ",".join(f"{k}={v}" for k, v in o.items()) for m, o in RECOMMENDED_OPTIONS.items())
GUIDANCE = 5.0  # classifier-free guidance for this model: 7.5 washes its colours out towards white
TOKEN = "sks"
INSTANCE_PROMPT = "a {token} {class_noun}"  # the captions' own form ("a red star ..."), not SD's "a photo of"
# Validation prompts in the captions' language, on backgrounds no instance image shows, so the tracked
# alignment (the share of prompted attributes the judge sees) measures whether the token took the background.
VALIDATION_PROMPTS = [f"a {{token}} {{class_noun}} on a {background} background" for background in W.UNSEEN_BACKGROUNDS]
# The app's demo and the learning test train half the recipe's steps at twice its rate, so a newcomer waits half
# as long: LoRA (with its recommended options) recognised on the demo concept in 11 of 12 images (9 of 12 at the
# recipe's rate, 11 of 12 after the full recipe).
DEMO_STEPS = STEPS // 2
DEMO_LR_FACTOR = 2 * LR_FACTOR
DEMO_CONCEPT = "pink-heart"  # the concept the app offers as a demo (4 images also in examples/shapes-pink-heart)


def learning_rate(method: str, factor: float = LR_FACTOR) -> float:
    """The recipe's learning rate of `method`: its paper default times `factor`."""
    return get_method(method).train_defaults.lr * factor


def train_settings(method: str, lr_factor: float = LR_FACTOR) -> dict:
    """The recipe as TrainConfig fields, `RECOMMENDED_OPTIONS` included (add instance_images, output_dir and any others)."""
    return dict(
        base_model="shapes",
        method=method,
        method_options=dict(RECOMMENDED_OPTIONS.get(method, {})),
        snr_gamma=SNR_GAMMA,
        token=TOKEN,
        class_noun=W.CLASS_NOUN,
        instance_prompt=INSTANCE_PROMPT,
        steps=STEPS,
        batch_size=BATCH_SIZE,
        lr=learning_rate(method, lr_factor),
        prior="none",
        validation_prompts=list(VALIDATION_PROMPTS),
        validation_guidance=GUIDANCE,
    )


def demo_settings(method: str) -> dict:
    """The demo's TrainConfig fields (the app's demo button and the learning test): the recipe at
    `DEMO_STEPS` and `DEMO_LR_FACTOR`."""
    return train_settings(method, DEMO_LR_FACTOR) | {"steps": DEMO_STEPS}


def demo_images(folder: str | Path) -> list[Path]:
    """Write the demo concept's 4 instance images into `folder` and return their paths."""
    return W.write_instance_images(W.concept_by_name(DEMO_CONCEPT), folder)
