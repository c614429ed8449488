"""The shapes world: deterministic by seed, captions that name what is drawn, held-out parts that
pretraining never sees, and the judge reading clean renders."""

from __future__ import annotations

import numpy as np

from personalize.shapes import judge as J
from personalize.shapes import world as W


def test_same_seed_same_world():
    a = W.render_batch(W.pretraining_set(20, seed=3))
    b = W.render_batch(W.pretraining_set(20, seed=3))
    c = W.render_batch(W.pretraining_set(20, seed=4))
    assert a.shape == (20, W.RESOLUTION, W.RESOLUTION, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pretraining_never_draws_held_out_parts():
    scenes = W.pretraining_set(3000, seed=0)
    assert not {s.shape for s in scenes} & set(W.CONCEPT_SHAPES)
    assert not {s.pattern for s in scenes} & set(W.CONCEPT_PATTERNS)
    assert not {(s.shape, s.colour) for s in scenes} & W.HELD_OUT_PAIRS
    assert {s.shape for s in scenes} == set(W.SHAPES)  # everything else does appear
    assert {s.background for s in scenes} == set(W.BACKGROUND_NAMES)


def test_captions_name_the_scene_and_never_a_rare_token():
    rng = np.random.default_rng(0)
    scene = W.Scene("star", "red", "striped", "navy", 0.3, 0.5, 0.5, 0.0)
    assert W.caption(scene) == "a red striped star on a navy background"
    assert W.caption(W.Scene("ring", "orange", "solid", "teal", 0.3, 0.5, 0.5, 0.0)) == "an orange solid ring on a teal background"
    captions = [W.caption(s, rng) for s in W.pretraining_set(2000, seed=1)]
    words = {w for c in captions for w in c.replace(",", " ").split()}
    assert "sks" not in words and W.CLASS_NOUN in words
    assert all(c and "  " not in c and not c.endswith((" on", ",")) for c in captions)


def test_object_inside_image_and_mask_marks_it():
    rng = np.random.default_rng(2)
    for concept in W.CONCEPTS:
        scene = W.concept_scene(concept, rng)
        image, mask = W.render_with_mask(scene, 64)
        m = np.asarray(mask) > 127
        assert 0.05 < m.mean() < 0.6
        assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()


def test_instance_images_vary_background_and_position(tmp_path):
    paths = W.write_instance_images(W.CONCEPTS[0], tmp_path, count=4)
    assert [p.name for p in paths] == [f"{W.CONCEPTS[0].name}-{i}.png" for i in range(1, 5)]
    arrays = [np.asarray(__import__("PIL.Image").Image.open(p)) for p in paths]
    assert all(a.shape == (128, 128, 3) for a in arrays)
    assert len({a[0, 0].tobytes() for a in arrays}) == 4  # four backgrounds


def test_prompt_attributes():
    assert J.prompt_attributes("a red striped star on a navy background") == {
        "colour": "red",
        "pattern": "striped",
        "shape": "star",
        "background": "navy",
    }
    assert J.prompt_attributes("a sks shape on a teal background") == {"background": "teal"}
    assert J.prompt_attributes("a photo of sks shape") == {}


def test_judge_reads_clean_renders():
    rng = np.random.default_rng(11)
    scenes = [W.random_scene(rng, shapes=W.ALL_SHAPES, patterns=W.ALL_PATTERNS) for _ in range(200)]
    readings = J.predict([W.render(s) for s in scenes])
    for attribute in J.ATTRIBUTES:
        accuracy = np.mean([r[attribute] == getattr(s, attribute) for r, s in zip(readings, scenes)])
        assert accuracy > 0.9, (attribute, accuracy)
    assert J.embed([W.render(s) for s in scenes[:3]]).shape == (3, J.FEATURES)
