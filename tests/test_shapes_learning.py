"""The built-in `shapes` model loads offline, generates, and learns: after a short training run with the
method's setting on `shapes` (the demo's half of it), the judge recognises the subject (shape, colour and
pattern all right) in most images of prompts on backgrounds the instance images do not show, where it
recognised it in few of the base model's images of the same prompts and seeds. Two LoRA cases: the demo
concept (a shape pretraining never drew), and an evaluation subject of the subject tier (made of parts
pretraining drew; LoRA binds it only with the recipe's keep_unconditional, BENCHMARKS.md). No seed method
is here yet: none met the subject goal robustly (LoLDU read 0.00 on this tier's diamond at the demo's setting)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from personalize import load_pipeline
from personalize.generate import AdapterSpec, generate
from personalize.shapes import judge as J
from personalize.shapes import recipe
from personalize.shapes import world as W
from personalize.train import TrainConfig, train

# (method, subject): LoRA, among the quickest per step (BENCHMARKS.md), at its setting on `shapes`.
CASES = [("lora", recipe.DEMO_CONCEPT), ("lora", "purple-solid-ring")]
# The goal: recognised in 0.6 or more of the images, and at least 0.4 more often than by the base model.
# Measured (12 images a side): LoRA on the heart 0.75 vs 0.00, judge cosine 0.70 -> 0.92 (0.92 before keep_unconditional);
# LoRA on the ring 1.00 vs 0.00, cosine 0.73 -> 0.97 (at the full recipe without keep_unconditional it read 0.25).
FIDELITY, FIDELITY_GAIN = 0.6, 0.4
COSINE_GAIN = 0.05  # the judge's features move towards the instance images too (measured +0.24)
PROMPTS = [f"a {recipe.TOKEN} {W.CLASS_NOUN} on a {bg} background" for bg in W.UNSEEN_BACKGROUNDS]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("shapes", device="cpu")


def judged(images, reference, concept: W.Concept) -> tuple[float, float, float]:
    """(mean judge-feature cosine to `reference`, share with the concept's shape, share recognised)."""
    readings = J.predict(images)
    cosine = float((J.embed(images) @ J.embed(reference).T).mean())
    shape = float(np.mean([r["shape"] == concept.shape for r in readings]))
    return cosine, shape, float(np.mean([J.recognises(r, concept) for r in readings]))


def test_shapes_loads_as_a_stable_diffusion_pipeline(pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.config._name_or_path == "shapes"
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    images = generate(pipe, "a red striped star on a navy background", num_images=2, steps=10)
    assert images[0].image.size == (W.RESOLUTION, W.RESOLUTION)
    arrays = [np.asarray(g.image) for g in images]
    assert not np.array_equal(arrays[0], arrays[1])  # two seeds, two images


@pytest.mark.parametrize("method, subject", CASES)
def test_a_short_run_teaches_the_subject(pipe, tmp_path, method, subject):
    concept = W.concept_by_name(subject)
    instances = [Image.open(p).convert("RGB") for p in W.write_instance_images(concept, tmp_path / "instances")]
    render = dict(num_images=4, steps=25, guidance=recipe.GUIDANCE)  # 12 images a side
    base = [g.image for p in PROMPTS for g in generate(pipe, p, **render)]
    result = train(
        TrainConfig(
            instance_images=str(tmp_path / "instances"),
            output_dir=str(tmp_path / "run"),
            validation_every=0,
            checkpoint_every=0,
            cpu=True,
            **recipe.demo_settings(method),
        )
    )
    tuned = [g.image for p in PROMPTS for g in generate(pipe, p, adapters=[AdapterSpec(result.adapter_path)], **render)]
    before, after = judged(base, instances, concept), judged(tuned, instances, concept)
    print(f"\n{method} on {subject}: cosine, shape share, recognised: base {before}, trained {after}")
    assert after[2] >= FIDELITY and after[2] - before[2] >= FIDELITY_GAIN, (before, after)
    assert after[0] - before[0] >= COSINE_GAIN, (before, after)
