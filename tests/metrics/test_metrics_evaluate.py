"""`evaluate` end to end with the tiny embedders: report contents, aggregation, placeholders, refusals."""

from __future__ import annotations

import json

import pytest
from metrics_testdata import manifest_record

from metrics import evaluate, mean_pairwise_cosine, tiny_embedders
from metrics.images import open_image

PROMPTS = ["a sks dog in the snow", "a sks dog on the beach", "a red sks dog", "a sks dog in the jungle"]


def test_report_records_values_backbones_and_counts(make_real, make_generated):
    real = make_real(n=3)
    generated = make_generated([manifest_record(i, p) for i, p in enumerate(PROMPTS)])
    report = evaluate(real, generated, embedders="tiny")
    assert set(report["metrics"]) == {"dino", "clip_i", "clip_t", "vendi"}
    assert report["subjects"] == {"real": {"real_images": 3, "generated_images": 4}}
    assert report["inputs"]["metadata_from"] == "manifest.jsonl"
    assert report["inputs"]["placeholder_tokens"] == ["sks"]
    assert report["run"] == {"methods": ["lora"], "base_models": ["tiny-sd"]}
    assert report["skipped"] == {}
    for name, entry in report["metrics"].items():
        assert {"value", "backbone", "preprocessing", "aggregation", "higher_is_better"} <= set(entry), name
        assert entry["value"] == pytest.approx(entry["per_subject"]["real"])
    assert 1.0 <= report["metrics"]["vendi"]["value"] <= 4.0
    assert "DINO stand-in" in report["metrics"]["dino"]["backbone"]
    json.dumps(report)  # JSON-ready


def test_dino_value_equals_the_math_on_the_embeddings(make_real, make_generated):
    real = make_real(n=2)
    generated = make_generated([manifest_record(i, p) for i, p in enumerate(PROMPTS[:3])])
    report = evaluate(real, generated, metrics=["dino"], embedders="tiny")
    dino = tiny_embedders()["dino"]
    r = dino.embed_images([open_image(p) for p in sorted(real.glob("*.jpg"))])
    g = dino.embed_images([open_image(generated / f"{i:04d}.png") for i in range(3)])
    assert report["metrics"]["dino"]["value"] == pytest.approx(mean_pairwise_cosine(r, g), abs=1e-6)


def test_per_subject_then_mean_and_flat_pair_mean(make_real, make_generated):
    real = make_real(subjects=["cat", "dog"], n=2)
    records = [manifest_record(0, "a sks cat", "cat")] + [manifest_record(i, "a sks dog", "dog") for i in (1, 2, 3)]
    report = evaluate(real, make_generated(records), metrics="dino,vendi", embedders="tiny")
    dino = report["metrics"]["dino"]
    cat, dog = dino["per_subject"]["cat"], dino["per_subject"]["dog"]
    assert dino["value"] == pytest.approx((cat + dog) / 2)
    assert dino["flat"] == pytest.approx((cat * 2 * 1 + dog * 2 * 3) / 8)
    assert report["subjects"]["dog"] == {"real_images": 2, "generated_images": 3}
    assert report["metrics"]["vendi"]["per_subject"]["cat"] == pytest.approx(1.0)


def test_placeholder_tokens_are_removed_before_clip_t(make_real, make_generated):
    real = make_real(n=1)
    with_token = make_generated([manifest_record(i, p) for i, p in enumerate(PROMPTS)], name="token")
    clean = [manifest_record(i, p.replace("sks ", ""), token=None) for i, p in enumerate(PROMPTS)]
    without = make_generated(clean, name="clean")
    unstripped = make_generated([manifest_record(i, p, token=None) for i, p in enumerate(PROMPTS)], name="raw")

    def clip_t(folder, **kwargs):
        return evaluate(real, folder, metrics=["clip_t"], embedders="tiny", **kwargs)["metrics"]["clip_t"]["value"]

    assert clip_t(with_token) == pytest.approx(clip_t(without), abs=1e-6)
    assert clip_t(unstripped) != pytest.approx(clip_t(without), abs=1e-6)
    assert clip_t(unstripped, placeholder_tokens="sks") == pytest.approx(clip_t(without), abs=1e-6)


def test_clip_t_is_skipped_with_a_reason_when_prompts_are_missing(make_real, tmp_path):
    from metrics_testdata import save_image

    save_image(tmp_path / "gen" / "a.png", seed=1)
    save_image(tmp_path / "gen" / "b.png", seed=2)
    report = evaluate(make_real(n=2), tmp_path / "gen", metrics=["clip_i", "clip_t"], embedders="tiny")
    assert list(report["metrics"]) == ["clip_i"]
    assert "2 generated image(s) have no prompt (first: a.png)" in report["skipped"]["clip_t"]


def test_kid_and_fid_pool_all_subjects(make_real, make_generated):
    real = make_real(subjects=["cat", "dog"], n=9)
    records = [manifest_record(i, "a sks pet", "cat" if i < 9 else "dog") for i in range(18)]
    report = evaluate(real, make_generated(records), metrics=["kid", "fid"], embedders="tiny", kid_subsets=5)
    assert set(report["metrics"]["kid"]) >= {"value", "std", "subsets"}
    assert report["metrics"]["fid"]["value"] >= 0.0
    assert "pooled over all subjects" in report["metrics"]["fid"]["aggregation"]


def test_fid_refuses_small_sets_and_suggests_kid(make_real, make_generated):
    generated = make_generated([manifest_record(i, p) for i, p in enumerate(PROMPTS)])
    with pytest.raises(ValueError, match=r"FID needs more images than the feature dimension \(16\).*got 3 and 4.*KID"):
        evaluate(make_real(n=3), generated, metrics=["dino", "fid"], embedders="tiny")


def test_bad_inputs_name_the_value_and_what_is_accepted(make_real, make_generated, tmp_path):
    real = make_real(n=1)
    generated = make_generated([manifest_record(0, "a sks dog")])
    accepted = "accepted: dino, dinov2, clip_i, clip_t, vendi, kid, fid"
    with pytest.raises(ValueError, match=f"unknown metric.*'lpips'; {accepted}"):
        evaluate(real, generated, metrics=["dino", "lpips"], embedders="tiny")
    with pytest.raises(ValueError, match="unknown embedder set 'huge'; accepted: default, tiny"):
        evaluate(real, generated, embedders="huge")
    with pytest.raises(ValueError, match="no embedder for role.*clip"):
        evaluate(real, generated, metrics=["clip_i"], embedders={"dino": tiny_embedders()["dino"]})
    with pytest.raises(FileNotFoundError, match="generated image folder not found"):
        evaluate(real, tmp_path / "nope", embedders="tiny")
    (generated / "0000.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read image .*0000.png"):
        evaluate(real, generated, metrics=["dino"], embedders="tiny")


def test_custom_embedder_dict(make_real, make_generated):
    tiny = tiny_embedders()
    report = evaluate(
        make_real(n=2), make_generated([manifest_record(0, "a sks dog")]), metrics=["clip_i"], embedders={"clip": tiny["clip"]}
    )
    assert report["metrics"]["clip_i"]["backbone"] == tiny["clip"].name
