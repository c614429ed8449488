"""Embedders: tiny stand-ins (shapes, normalisation, determinism), local-path loading, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metrics.embedders import ImageEmbedder, ImageTextEmbedder, load_embedder, tiny_embedders
from metrics.embedders.clip import clip_embedder
from metrics.embedders.inception import inception_embedder
from metrics.embedders.tiny import _build_clip, _build_dino, _build_dinov2, _seeded
from metrics.embedders.vit import dino_embedder, dinov2_embedder


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


def test_tiny_embedders_follow_the_protocol():
    embedders = tiny_embedders()
    assert set(embedders) == {"dino", "dinov2", "clip", "inception"}
    assert all(isinstance(e, ImageEmbedder) for e in embedders.values())
    assert isinstance(embedders["clip"], ImageTextEmbedder)
    for role, embedder in embedders.items():
        out = embedder.embed_images(images(3))
        assert out.shape == (3, embedder.dim), role
        assert embedder.name and embedder.preprocessing, role


@pytest.mark.parametrize("role", ["dino", "dinov2", "clip"])
def test_tiny_similarity_embeddings_are_unit_norm_and_batched_consistently(role):
    embedder = tiny_embedders()[role]
    batch = images(5, seed=1)
    out = embedder.embed_images(batch)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)
    one_by_one = torch.cat([embedder.embed_images([im]) for im in batch])
    assert torch.allclose(out, one_by_one, atol=1e-5)


def test_tiny_clip_texts_and_grayscale_images():
    clip = tiny_embedders()["clip"]
    texts = clip.embed_texts(["a dog", "a dog on the beach", "a dog"])
    assert texts.shape == (3, clip.dim)
    assert torch.allclose(texts[0], texts[2]) and not torch.allclose(texts[0], texts[1])
    gray = Image.new("L", (20, 20), 128)
    assert clip.embed_images([gray]).shape == (1, clip.dim)


def test_tiny_models_are_deterministic_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first = _seeded(_build_dino)()[0].state_dict()
    second = _seeded(_build_dino)()[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(state, torch.random.get_rng_state())


def test_dino_and_dinov2_load_from_a_local_folder(tmp_path):
    for build, factory, name in ((_build_dino, dino_embedder, "dino"), (_build_dinov2, dinov2_embedder, "dinov2")):
        model, processor = _seeded(build)()
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        local = factory(str(tmp_path / name))
        reference = tiny_embedders()[name]
        batch = images(2, seed=2)
        assert torch.allclose(local.embed_images(batch), reference.embed_images(batch), atol=1e-5)
        assert local.name == str(tmp_path / name)


def test_dino_loads_without_a_pooler(tmp_path):
    model, processor = _seeded(_build_dino)()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    embedder = dino_embedder(str(tmp_path))
    embedder.embed_images(images(1))
    assert embedder._model_and_processor[0].pooler is None


def test_clip_loads_from_a_local_open_clip_folder(tmp_path):
    model, _, _ = _seeded(_build_clip)()
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    local = clip_embedder(str(tmp_path))
    reference = tiny_embedders()["clip"]
    batch = images(2, seed=3)
    assert torch.allclose(local.embed_images(batch), reference.embed_images(batch), atol=1e-5)
    assert torch.allclose(local.embed_texts(["a dog"]), reference.embed_texts(["a dog"]), atol=1e-5)


def test_inception_loads_local_weights_with_2048_features(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from torchmetrics.image.fid import NoTrainInceptionV3

    # Build a randomly initialised network once (no download), save it as a local weights file.
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    random_net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    monkeypatch.undo()
    weights = tmp_path / "inception.pth"
    torch.save(random_net.state_dict(), weights)

    # No forward pass here: 299x299 InceptionV3 takes seconds on CPU; tiny_inception covers embed_images.
    embedder = inception_embedder(str(weights), device=torch.device("cpu"))
    loaded = embedder._model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in random_net.state_dict().items())
    assert embedder.dim == 2048 and str(weights) in embedder.name and "299x299" in embedder.preprocessing


@pytest.mark.parametrize(
    "kind, source",
    [
        ("clip", "/no/such/dir/open_clip_model.bin"),
        ("dino", "./missing-dino-folder"),
        ("dinov2", "~/no-such-dinov2.safetensors"),
        ("inception", "/no/such/pt_inception.pth"),
    ],
)
def test_missing_local_files_raise_a_clear_error(kind, source):
    with pytest.raises(FileNotFoundError, match="not found: .*no-such|not found: .*no/such|not found: .*missing"):
        load_embedder(source, kind)


def test_load_embedder_caches_is_lazy_and_checks_kind():
    first = load_embedder("facebook/dino-vits16", "dino")
    assert load_embedder("facebook/dino-vits16", "dino") is first
    assert "_model_and_processor" not in vars(first)  # nothing loaded (nor downloaded) yet
    assert load_embedder("ViT-L-14", "clip").name == "open_clip ViT-L-14 (openai) QuickGELU"
    with pytest.raises(ValueError, match="unknown embedder kind 'sift'; accepted: dino, dinov2, clip, inception"):
        load_embedder("x", "sift")
