"""Reading real and generated images (folders, mappings, manifest.jsonl, PNG text) and prompt clean-up."""

from __future__ import annotations

import json

import pytest
from metrics_testdata import manifest_record, save_image

from metrics.dreambench import dreambench_prompts, load_dreambench
from metrics.inputs import group_by_subject, read_generated, read_real
from metrics.prompts import strip_placeholders


def test_real_single_folder_subject_folders_and_mapping(make_real, tmp_path):
    single = make_real(n=2, name="dog")
    assert {k: [p.name for p in v] for k, v in read_real(single).items()} == {"dog": ["img0.jpg", "img1.jpg"]}
    nested = make_real(subjects=["cat", "dog"], n=2, name="subjects")
    assert sorted(read_real(nested)) == ["cat", "dog"]
    mapping = {"teapot": [single / "img0.jpg"]}
    assert read_real(mapping) == {"teapot": [single / "img0.jpg"]}


def test_real_bad_inputs_name_the_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="real image folder not found: .*nowhere"):
        read_real(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images in the real image folder .*empty; accepted: \.png"):
        read_real(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="subject 'dog' not found: .*gone.png"):
        read_real({"dog": [tmp_path / "gone.png"]})
    with pytest.raises(ValueError, match="'dog' has no images"):
        read_real({"dog": []})


def test_generated_from_manifest(make_generated):
    folder = make_generated([manifest_record(0, "a sks dog"), manifest_record(1, "a sks dog in the snow")])
    images, source = read_generated(folder)
    assert source == "manifest.jsonl"
    assert [(g.path.name, g.prompt, g.tokens, g.methods) for g in images] == [
        ("0000.png", "a sks dog", ("sks",), ("lora",)),
        ("0001.png", "a sks dog in the snow", ("sks",), ("lora",)),
    ]


def test_generated_from_png_text_without_manifest(make_generated, tmp_path):
    folder = make_generated([manifest_record(0, "a sks dog", token="<v>")], manifest=False)
    (image,) = read_generated(folder)[0]
    assert (image.prompt, image.tokens, image.base_model) == ("a sks dog", ("<v>",), "tiny-sd")
    plain = tmp_path / "plain"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "a photo")
    save_image(plain / "x.png", seed=1, pnginfo=info)
    (image,) = read_generated(plain)[0]
    assert (image.prompt, image.tokens, image.subject) == ("a photo", (), None)


def test_generated_bad_inputs(make_generated, tmp_path):
    with pytest.raises(FileNotFoundError, match="generated image folder not found"):
        read_generated(tmp_path / "missing")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no images in the generated image folder"):
        read_generated(tmp_path / "none")
    folder = make_generated([manifest_record(0, "a dog")])
    (folder / "manifest.jsonl").write_text('{"file": "0000.png"}\n{not json\n')
    with pytest.raises(ValueError, match="manifest.jsonl line 2 is not valid JSON"):
        read_generated(folder)
    (folder / "manifest.jsonl").write_text('{"file": "9999.png", "prompt": "x"}\n')
    with pytest.raises(FileNotFoundError, match="image file not found: .*9999.png"):
        read_generated(folder)


@pytest.mark.parametrize("entry", ["../outside.png", "../generated/../outside.png", "{tmp}/outside.png", "sub/../../outside.png"])
def test_manifest_entries_outside_the_folder_are_refused(entry, make_generated, tmp_path):
    save_image(tmp_path / "outside.png", seed=7)  # a real image, one level above the generated folder
    folder = make_generated([manifest_record(0, "a dog")])
    entry = entry.format(tmp=tmp_path)
    (folder / "manifest.jsonl").write_text(json.dumps({**manifest_record(0, "a dog"), "file": entry}) + "\n")
    with pytest.raises(ValueError) as info:
        read_generated(folder)
    message = str(info.value)
    assert f"manifest.jsonl line 1: 'file' {entry!r} is outside the generated image folder" in message and "\n" not in message


def test_manifest_entries_in_subfolders_are_read(make_generated):
    folder = make_generated([manifest_record(0, "a dog")])
    save_image(folder / "sub" / "one.png", seed=3)
    (folder / "manifest.jsonl").write_text(json.dumps({**manifest_record(0, "a dog"), "file": "sub/../sub/one.png"}) + "\n")
    (image,) = read_generated(folder)[0]
    assert image.path.resolve() == (folder / "sub" / "one.png").resolve()


def test_group_by_subject(make_real, make_generated):
    real = read_real(make_real(subjects=["cat", "dog"], n=1))
    generated, _ = read_generated(make_generated([manifest_record(0, "a", "dog"), manifest_record(1, "b", "dog")]))
    assert {s: len(g) for s, g in group_by_subject(real, generated).items()} == {"dog": 2}
    unlabelled, _ = read_generated(make_generated([manifest_record(0, "a")], name="unlabelled"))
    with pytest.raises(ValueError, match="carry no subject but there are 2 real subjects"):
        group_by_subject(real, unlabelled)
    stranger, _ = read_generated(make_generated([manifest_record(0, "a", "owl")], name="owl"))
    with pytest.raises(ValueError, match="'owl' have no real images; real subjects: cat, dog"):
        group_by_subject(real, stranger)
    single = read_real({"my_dog": [g.path for g in generated]})
    assert list(group_by_subject(single, unlabelled)) == ["my_dog"]


@pytest.mark.parametrize(
    "prompt, tokens, expected",
    [
        ("a sks dog in the snow", ["sks"], "a dog in the snow"),
        ("a photo of sks, a dog", ["sks"], "a photo of, a dog"),
        ("a <sks> dog", ["<sks>"], "a dog"),
        ("a sksy dog", ["sks"], "a sksy dog"),
        ("sks", ["sks"], ""),
        ("a dog", [], "a dog"),
    ],
)
def test_strip_placeholders(prompt, tokens, expected):
    assert strip_placeholders(prompt, tokens) == expected


def test_dreambench_package_data():
    data = load_dreambench()
    assert len(data["subjects"]) == 30 and len(data["object_prompts"]) == 25
    prompts = dreambench_prompts("dog", "sks")
    assert len(prompts) == 25 and prompts[0] == "a sks dog in the jungle"
    assert "a sks backpack wearing a red hat" not in dreambench_prompts("backpack", "sks")
    with pytest.raises(ValueError, match="unknown DreamBench subject 'owl'"):
        dreambench_prompts("owl", "sks")
