"""The shapes world: deterministic by seed, captions that name what is drawn, held-out parts that
pretraining never sees, and the judge reading clean renders."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

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


# The subject tier, as issue 29 lists it: (name, shape, colour, pattern, split, on a held-out pair).
SUBJECT_TIER = [
    ("red-striped-star", "star", "red", "striped", W.TUNING, False),
    ("orange-dotted-circle", "circle", "orange", "dotted", W.TUNING, True),
    ("green-solid-triangle", "triangle", "green", "solid", W.TUNING, False),
    ("blue-striped-square", "square", "blue", "striped", W.EVALUATION, True),
    ("yellow-dotted-diamond", "diamond", "yellow", "dotted", W.EVALUATION, False),
    ("purple-solid-ring", "ring", "purple", "solid", W.EVALUATION, True),
    ("pink-striped-cross", "cross", "pink", "striped", W.EVALUATION, False),
]


def test_subject_tier_is_made_of_parts_pretraining_drew():
    got = [(s.name, s.shape, s.colour, s.pattern, s.split, (s.shape, s.colour) in W.HELD_OUT_PAIRS) for s in W.SUBJECTS]
    assert got == SUBJECT_TIER
    for subject in W.SUBJECTS:
        assert subject.tier == W.SUBJECT_TIER and subject.shape in W.SHAPES and subject.colour in W.COLOURS
        assert subject.pattern in W.PATTERNS
        assert W.concept_by_name(subject.name) is subject
    assert [s.name for s in W.subjects(W.TUNING)] == [row[0] for row in SUBJECT_TIER if row[4] == W.TUNING]
    assert [s.name for s in W.subjects(W.EVALUATION)] == [row[0] for row in SUBJECT_TIER if row[4] == W.EVALUATION]
    assert all(c.tier == W.OUTLINES and c.split == "" and W.concept_by_name(c.name) is c for c in W.CONCEPTS)
    pretraining = {(s.shape, s.colour, s.pattern) for s in W.pretraining_set(3000, seed=0)}
    seen = [(s.shape, s.colour, s.pattern) in pretraining for s in W.SUBJECTS]
    assert seen == [not row[5] for row in SUBJECT_TIER]  # the held-out ones are new combinations, the others were drawn


def _digest(paths) -> str:
    return hashlib.sha256(b"".join(np.asarray(Image.open(p)).tobytes() for p in paths)).hexdigest()[:16]


def test_instance_images_keep_their_seeds(tmp_path):
    """The new-outline tier's images are those drawn before the subject tier existed (digests taken on
    6c90c4d); each subject has its own stable images."""
    before = {"pink-heart": "c0d20fbbb6bef666", "dotted-crescent": "c24c6882558a376f", "halves-hexagon": "7b617d1438bd4882"}
    assert {c.name: _digest(W.write_instance_images(c, tmp_path / c.name)) for c in W.CONCEPTS} == before
    subjects = {s.name: _digest(W.write_instance_images(s, tmp_path / s.name)) for s in W.SUBJECTS}
    assert len(set(subjects.values())) == len(W.SUBJECTS)
    again = W.SUBJECTS[3]
    assert _digest(W.write_instance_images(again, tmp_path / "again")) == subjects[again.name]


def test_judge_recognises_each_subject_in_its_instance_images(tmp_path):
    for subject in W.SUBJECTS:
        images = [Image.open(p).convert("RGB").resize((W.RESOLUTION,) * 2, Image.BOX) for p in W.write_instance_images(subject, tmp_path)]
        assert sum(J.recognises(r, subject) for r in J.predict(images)) >= 3, subject.name
