"""Generation with zero, one or two adapters (personalize/generate.py and `personalize generate`):
scaled deltas are summed into W0 and W0 comes back bit-exactly, scale 0 reproduces the base image,
PNG text and manifest.jsonl carry the parameters, --compare renders the same seeds without adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import personalize as P
from personalize.cli import main
from personalize.errors import UserError
from personalize.generate import AdapterSpec, adapters_applied, generate
from personalize.models import load_pipeline, tiny_unet

MANIFEST_KEYS = {"file", "prompt", "negative_prompt", "seed", "steps", "guidance", "base_model", "adapters", "subject"}


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny", device="cpu")


def make_adapter(path, method: str, token: str, class_noun: str, seed: int) -> str:
    """An adapter with random (non-zero) trained tensors, saved as training would save it."""
    unet = tiny_unet("sd1")
    adapter = P.attach(unet, method)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    adapter.save(path, metadata={"token": token, "class_noun": class_noun, "base_model": "tiny"})
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return (
        make_adapter(folder / "dog.safetensors", "svfit", "sks", "dog", 1),
        make_adapter(folder / "cat.safetensors", "lora", "zwx", "cat", 2),
    )


def weights(unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_two_adapters_add_their_scaled_deltas(pipe, adapters):
    dog, cat = adapters
    expected = {}
    for path, scale in ((dog, 0.7), (cat, -0.4)):
        loaded = P.load_adapter(tiny_unet("sd1"), path)
        loaded.scale = scale
        for name, delta in loaded.deltas().items():
            expected[name] = expected.get(name, 0) + delta
    before = weights(pipe.unet)
    with adapters_applied(pipe.unet, [AdapterSpec(dog, 0.7), AdapterSpec(cat, -0.4)]):
        for name, delta in expected.items():
            weight = pipe.unet.get_submodule(name).weight
            torch.testing.assert_close(weight, before[f"{name}.weight"] + delta, rtol=1e-5, atol=1e-6)
        assert len(expected) > 0
    after = weights(pipe.unet)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # W0 bit-exact


def test_scale_zero_reproduces_the_base_image(pipe, adapters):
    kwargs = dict(num_images=2, seed=3, steps=2)
    base = generate(pipe, "a photo of a dog", **kwargs)
    off = generate(pipe, "a photo of a dog", adapters=[AdapterSpec(adapters[0], 0.0), AdapterSpec(adapters[1], 0.0)], **kwargs)
    on = generate(pipe, "a photo of a dog", adapters=[AdapterSpec(adapters[0], 1.0)], **kwargs)
    for b, o, a in zip(base, off, on):
        assert np.array_equal(np.asarray(b.image), np.asarray(o.image))
        assert not np.array_equal(np.asarray(b.image), np.asarray(a.image))  # the adapter does change the image
    assert [g.seed for g in base] == [3, 4]


def test_pngs_and_manifest(pipe, adapters, tmp_path):
    specs = [AdapterSpec(adapters[0], 0.8)]
    images = generate(
        pipe,
        ["a photo of {token} {class_noun}", "a {token} {class_noun} on the beach"],
        adapters=specs,
        negative_prompt="blurry",
        num_images=2,
        seed=5,
        steps=2,
        guidance=6.0,
        output_dir=tmp_path,
        subject="dog6",
    )
    assert [g.path for g in images] == [str(tmp_path / f"{i:04d}.png") for i in range(4)]
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    first = records[0]
    assert set(first) == MANIFEST_KEYS
    assert first["prompt"] == "a photo of sks dog" and records[2]["prompt"] == "a sks dog on the beach"
    assert [r["seed"] for r in records] == [5, 6, 5, 6]
    assert (first["negative_prompt"], first["steps"], first["guidance"], first["base_model"], first["subject"]) == (
        "blurry",
        2,
        6.0,
        "tiny",
        "dog6",
    )
    assert first["adapters"] == [{"path": adapters[0], "scale": 0.8, "method": "svfit", "token": "sks", "class_noun": "dog"}]

    text = Image.open(tmp_path / "0001.png").text
    assert json.loads(text["parameters"]) == records[1]
    assert text["prompt"] == "a photo of sks dog" and text["seed"] == "6" and json.loads(text["adapters"]) == first["adapters"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "0000.png")), np.asarray(images[0].image))

    generate(pipe, "a dog", num_images=1, steps=2, output_dir=tmp_path)  # a second call extends the folder
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records][-1] == "0004.png" and records[-1]["adapters"] == [] and records[-1]["subject"] is None


def test_compare_renders_the_same_seeds_without_adapters(pipe, adapters, tmp_path):
    images = generate(
        pipe,
        "a photo of {token} {class_noun}",
        adapters=[AdapterSpec(adapters[1])],
        num_images=2,
        seed=1,
        steps=2,
        output_dir=tmp_path,
        compare=True,
    )
    base = generate(pipe, "a photo of zwx cat", num_images=2, seed=1, steps=2)
    for item, reference in zip(images, base):
        assert np.array_equal(np.asarray(item.baseline), np.asarray(reference.image))
        assert np.array_equal(np.asarray(Image.open(item.baseline_path)), np.asarray(reference.image))
    base_records = [json.loads(line) for line in (tmp_path / "base" / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in base_records] == ["0000.png", "0001.png"] and all(r["adapters"] == [] for r in base_records)
    grid = Image.open(tmp_path / "compare_0000.png")
    assert grid.size == (128, 128)  # 2 seeds side by side; top row without, bottom row with the adapter
    top_left = np.asarray(grid.crop((0, 0, 64, 64)).convert("RGB"))
    assert np.array_equal(top_left, np.asarray(base[0].image.convert("RGB")))


def test_cli_generate_with_two_adapters(adapters, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = [
        "generate",
        "--adapter",
        f"{adapters[0]}:0.5",
        "--adapter",
        adapters[1],
        "--prompt",
        "sks dog and zwx cat",
        "--num-images",
        "2",
        "--steps",
        "2",
        "--output",
        str(out),
    ]  # base model read from the adapter file
    assert main(argv) == 0
    assert "2 images" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all((out / r["file"]).is_file() for r in records)
    assert [(a["method"], a["scale"]) for a in records[0]["adapters"]] == [("svfit", 0.5), ("lora", 1.0)]
    assert records[0]["base_model"] == "tiny"


def test_generate_errors(pipe, adapters, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--base-model",
                "tiny",
                "--adapter",
                str(tmp_path / "missing.safetensors"),
                "--prompt",
                "x",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.safetensors' does not exist" in err[0]
    with pytest.raises(UserError, match=r"uses \{token\}/\{class_noun\}, but no adapter carries a token"):
        generate(pipe, "a {token}", steps=2)
    with pytest.raises(UserError, match="num_images must be a positive integer, got 0"):
        generate(pipe, "a dog", num_images=0)
    with pytest.raises(UserError, match="give at least one non-empty prompt"):
        generate(pipe, [])


def test_adapter_spec_parsing():
    assert AdapterSpec.parse("a.safetensors:0.5") == AdapterSpec("a.safetensors", 0.5)
    assert AdapterSpec.parse("out/a.safetensors") == AdapterSpec("out/a.safetensors", 1.0)
    assert AdapterSpec.parse(r"C:\runs\a.safetensors") == AdapterSpec(r"C:\runs\a.safetensors", 1.0)
    assert AdapterSpec.parse(r"C:\runs\a.safetensors:-1.5") == AdapterSpec(r"C:\runs\a.safetensors", -1.5)


def test_adapter_updates_are_cached_per_file_version(pipe, adapters, monkeypatch, tmp_path):
    import os
    import shutil

    import personalize.generate as G

    path = shutil.copy(adapters[0], tmp_path / "copy.safetensors")
    loads = []
    monkeypatch.setattr(G, "load_adapter", lambda unet, p, part: loads.append(p) or P.load_adapter(unet, p))
    first = G.unscaled_deltas(pipe.unet, path)
    assert G.unscaled_deltas(pipe.unet, path) is first and len(loads) == 1  # a second call reuses the update
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: load it again
    G.unscaled_deltas(pipe.unet, path)
    assert len(loads) == 2
