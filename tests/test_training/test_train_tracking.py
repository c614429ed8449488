"""Metric curves while training: the tracker's numbers, the best-step choice, best/ kept, resume."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import personalize
from metrics import evaluate
from metrics.tracking import MetricTracker, tracker_for
from personalize.io import adapter_info
from personalize.train import TrainCallback, TrainConfig, train
from personalize.training.selection import best_step, selection_score
from tests.helpers import imported_top_level
from tests.test_training.test_train_resume import CancelAt, assert_same_run

ONE_PROMPT = dict(validation_every=1, validation_prompts=["a {token} {class_noun}"], track_metrics="dino")  # no drift renders
TRACKED = dict(validation_every=2, validation_prompts=["a {token} {class_noun} in a field", "a {token} {class_noun} at night"])


class SaveValidations(TrainCallback):
    """Writes each validation's images with a manifest, as `personalize eval` reads them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.scores: dict[int, dict[str, float]] = {}

    def on_validation(self, validation) -> None:
        folder = self.folder / f"step_{validation.step}"
        folder.mkdir(parents=True)
        with open(folder / "manifest.jsonl", "w", encoding="utf-8") as manifest:
            for i, (image, prompt) in enumerate(zip(validation.images, validation.prompts)):
                image.save(folder / f"{i}.png")
                manifest.write(json.dumps({"file": f"{i}.png", "prompt": prompt}) + "\n")

    def on_scores(self, step: int, scores: dict[str, float], best: int | None) -> None:
        self.scores[step] = scores


class Synthetic(TrainCallback):
    """A stand-in tracker: fidelity peaks at `peak`, alignment falls, no drift."""

    def __init__(self, peak: int) -> None:
        self.peak = peak

    def on_validation(self, validation) -> None:
        step = validation.step
        validation.scores.update(fidelity=1.0 - abs(step - self.peak) / 10, alignment=0.5, drift=0.0)


def test_tracker_numbers_equal_personalize_eval(fast, photos, tmp_path):
    config = TrainConfig(**{**fast, **TRACKED, "track_embedders": "tiny"})
    saved = SaveValidations(tmp_path / "validations")
    result = train(config, [tracker_for(config), saved])
    assert [point["step"] for point in result.curves] == [0, 2, 4]
    for step in (0, 4):
        report = evaluate(photos, saved.folder / f"step_{step}", "dino,clip_i,clip_t,vendi", embedders="tiny", placeholder_tokens="sks")
        for name in ("dino", "clip_i", "clip_t", "vendi"):
            assert saved.scores[step][name] == pytest.approx(report["metrics"][name]["value"], rel=1e-6, abs=1e-7)
    assert result.curves[0]["drift"] == pytest.approx(0.0, abs=1e-6)  # step 0 is the base model itself
    assert result.best_step in (2, 4) and adapter_info(result.best_adapter)["metadata"]["steps"] == result.best_step
    records = [json.loads(line) for line in Path(result.output_dir, "log.jsonl").read_text().splitlines()]
    scored = [r for r in records if r.get("event") == "scores"]
    assert [r["step"] for r in scored] == [0, 2, 4] and all(r["render_seconds"] > 0 and r["score_seconds"] > 0 for r in scored)
    saved_result = json.loads(Path(result.output_dir, "result.json").read_text())
    assert saved_result["best_step"] == result.best_step and len(saved_result["curves"]) == 3


class Unreachable:
    """An embedder whose weights cannot be fetched (offline)."""

    name, dim, preprocessing = "unreachable", 8, "none"

    def embed_images(self, images):
        raise OSError("no network")


def test_tracking_off_and_unloadable_embedders(fast):
    assert tracker_for(TrainConfig(**{**fast, "track_metrics": "none"})) is None
    config = TrainConfig(**{**fast, **TRACKED})
    tracker = MetricTracker({"dino": Unreachable(), "clip": Unreachable(), "dinov2": Unreachable()})
    tracker.on_start(config, 4, 10)  # the run goes on untracked, with a warning
    assert tracker.disabled


def test_selection_rules_on_a_synthetic_curve():
    curve = [
        {"step": 0, "fidelity": 0.2, "alignment": 0.30, "drift": 0.0},
        {"step": 100, "fidelity": 0.5, "alignment": 0.30, "drift": 0.05},
        {"step": 200, "fidelity": 0.7, "alignment": 0.27, "drift": 0.10},  # balanced 0.63
        {"step": 300, "fidelity": 0.8, "alignment": 0.18, "drift": 0.20},  # balanced 0.48
        {"step": 400, "fidelity": 0.9, "alignment": 0.31, "drift": 0.40},  # over the drift limit
    ]
    assert selection_score(curve[2], "balanced", curve[0]) == pytest.approx(0.63)
    assert best_step(curve, "balanced", 0.25) == 200
    assert best_step(curve, "fidelity", 0.25) == 300
    assert best_step(curve, "fidelity", 1.0) == 400
    assert best_step(curve, "alignment", 0.25) == 100
    assert best_step(curve, "last", 1.0) == 400
    assert best_step(curve, "balanced", 0.01) == 100  # all over the limit: the least drift
    assert best_step([{"step": 0, "fidelity": 0.2}], "balanced", 0.25) is None  # the base model is never chosen
    tied = [{"step": 0}, {"step": 5, "fidelity": 0.5}, {"step": 10, "fidelity": 0.5}]
    assert best_step(tied, "balanced", 0.25) == 5  # ties: fewer steps


def test_best_adapter_is_kept_when_its_checkpoint_is_pruned(fast, tmp_path):
    settings = {**fast, **ONE_PROMPT, "steps": 5, "checkpoint_every": 1, "checkpoints_keep": 1}
    result = train(TrainConfig(**settings), [Synthetic(peak=2)])
    run = Path(result.output_dir)
    assert result.best_step == 2 and [p.name for p in (run / "checkpoints").iterdir()] == ["step_000005"]
    best = load_file(run / "best" / "adapter.safetensors")
    final = load_file(result.adapter_path)
    assert adapter_info(run / "best" / "adapter.safetensors")["metadata"]["steps"] == 2
    assert any(not torch.equal(best[k], final[k]) for k in best)


def test_resume_keeps_the_curve_and_the_best_step(fast, tmp_path):
    settings = {**fast, **ONE_PROMPT, "steps": 5, "checkpoint_every": 2, "checkpoints_keep": 3}
    full = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "full")}), [Synthetic(peak=3)])
    part = tmp_path / "part"
    cancel = threading.Event()
    train(TrainConfig(**{**settings, "output_dir": str(part)}), [CancelAt(3, cancel), Synthetic(peak=3)], cancel)
    shutil.rmtree(part / "checkpoints" / "step_000003")  # best/ now holds step 3, later than the checkpoint resumed from
    resumed = train(TrainConfig(**{**settings, "output_dir": str(part), "resume": True}), [Synthetic(peak=3)])
    assert_same_run(full, resumed)
    assert resumed.curves == full.curves and resumed.best_step == full.best_step == 3
    first, second = load_file(full.best_adapter), load_file(resumed.best_adapter)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_personalize_never_imports_metrics():
    """The tracker plugs in through the callbacks; the library itself stays free of the metrics package."""
    files = sorted(Path(personalize.__file__).parent.rglob("*.py"))
    assert files and all("metrics" not in imported_top_level(path) for path in files)
