"""How to personalise the built-in `shapes` model: one training recipe, chosen once for this model
size, used by `personalize bench --quality`, the app's demo concept and (at half its steps) the learning test.

The methods' default learning rates come from their papers, for SD's 860M-parameter UNet at 512 px
and hundreds of steps. On this 1.5M-parameter UNet at 32 px, `STEPS` steps of `BATCH_SIZE` images at
`LR_FACTOR` times that rate, without prior preservation, gave the best concept fidelity of the
settings tried for LoRA (BENCHMARKS.md, "Quality on `shapes`", lists them).
"""

from __future__ import annotations

from pathlib import Path

from ..adapters import get_method
from . import world as W

STEPS = 300
BATCH_SIZE = 4  # all 4 instance images in every step: less gradient noise at no cost at 32 px
LR_FACTOR = 20.0
GUIDANCE = 5.0  # classifier-free guidance for this model: 7.5 washes its colours out towards white
TOKEN = "sks"
INSTANCE_PROMPT = "a {token} {class_noun}"  # the captions' own form ("a red star ..."), not SD's "a photo of"
# Validation prompts in the captions' language, on backgrounds no instance image shows, so the tracked
# alignment (the share of prompted attributes the judge sees) measures whether the token took the background.
VALIDATION_PROMPTS = [f"a {{token}} {{class_noun}} on a {background} background" for background in W.UNSEEN_BACKGROUNDS]
# The app's demo trains half the recipe's steps: on the demo concept fidelity peaks at 100-150 steps and the
# balanced rule chose 150 (BENCHMARKS.md, "Metric curves while training"), so a newcomer waits half as long.
DEMO_STEPS = STEPS // 2
DEMO_CONCEPT = "pink-heart"  # the concept the app offers as a demo (4 images also in examples/shapes-pink-heart)


def learning_rate(method: str, factor: float = LR_FACTOR) -> float:
    """The recipe's learning rate of `method`: its paper default times `factor`."""
    return get_method(method).train_defaults.lr * factor


def train_settings(method: str, lr_factor: float = LR_FACTOR) -> dict:
    """The recipe as TrainConfig fields (add instance_images, output_dir and any others)."""
    return dict(
        base_model="shapes",
        method=method,
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


def demo_images(folder: str | Path) -> list[Path]:
    """Write the demo concept's 4 instance images into `folder` and return their paths."""
    return W.write_instance_images(W.concept_by_name(DEMO_CONCEPT), folder)
