"""Checkpoints, cancel and resume: a resumed run reproduces the uninterrupted one; output folders of other
runs are refused unless resume/overwrite; callbacks see every step and the validation samples."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personalize.errors import UserError
from personalize.train import Progress, TrainCallback, TrainConfig, TrainResult, train


def step_losses(folder: Path) -> dict[int, float]:
    records = map(json.loads, (folder / "log.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


class CancelAt(TrainCallback):
    def __init__(self, step: int, event: threading.Event) -> None:
        self.step, self.event = step, event

    def on_step(self, progress: Progress) -> None:
        if progress.step == self.step:
            self.event.set()


def resumed_run(settings: dict, folder: Path):
    """A run of `settings` in `folder`, cancelled after step 3 with step 3's checkpoint removed, then
    resumed from step 2 (needs checkpoint_every 2 and 4 or more steps): its TrainResult."""
    cancel = threading.Event()
    train(TrainConfig(**{**settings, "output_dir": str(folder)}), [CancelAt(3, cancel)], cancel)
    shutil.rmtree(folder / "checkpoints" / "step_000003")
    return train(TrainConfig(**{**settings, "output_dir": str(folder), "resume": True}))


def assert_same_run(a, b) -> None:
    """Two TrainResults with the same logged losses and bit-identical adapters."""
    assert step_losses(Path(a.output_dir)) == step_losses(Path(b.output_dir))
    first, second = load_file(a.adapter_path), load_file(b.adapter_path)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_resume_reproduces_the_uninterrupted_run(fast, tmp_path, class_dir):
    settings = {
        **fast,
        "method": "lora",
        "steps": 6,
        "lr": 1e-2,
        "prior": "images",
        "checkpoint_every": 2,
        "checkpoints_keep": 2,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
    }
    full = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "full")}))
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    class_files = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}

    cancel = threading.Event()
    part = tmp_path / "part"
    stopped = train(TrainConfig(**{**settings, "output_dir": str(part)}), [CancelAt(3, cancel)], cancel)
    assert stopped.cancelled and stopped.steps_done == 3
    assert (part / "adapter.safetensors").is_file() and json.loads((part / "result.json").read_text())["cancelled"]
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_000002", "step_000003"]  # cancel saves one

    # pretend the process died after step 3 before its checkpoint: resume from step 2, log records of step 3 are redone
    shutil.rmtree(part / "checkpoints" / "step_000003")
    resumed = train(TrainConfig(**{**settings, "output_dir": str(part), "resume": True}))
    assert resumed.resumed_from == 2 and resumed.steps_done == 6 and not resumed.cancelled

    expected, got = step_losses(tmp_path / "full"), step_losses(part)
    assert sorted(got) == list(range(1, 7))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert resumed.eval_loss_start == full.eval_loss_start
    assert resumed.eval_loss_end == pytest.approx(full.eval_loss_end, rel=1e-6)
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(part / "adapter.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == class_files  # class images reused, untouched


def test_output_folder_of_another_run(fast, tmp_path):
    out = Path(fast["output_dir"])
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    train(TrainConfig(**{**fast, "method": "svfit", "steps": 2}))
    with pytest.raises(UserError, match=r"already holds a training run .*set resume .*overwrite .*output_dir"):
        train(TrainConfig(**{**fast, "method": "svfit", "steps": 2}))
    with pytest.raises(UserError, match=r"cannot resume .*method: saved 'svfit', now 'loldu'"):
        train(TrainConfig(**{**fast, "method": "loldu", "resume": True}))
    result = train(TrainConfig(**{**fast, "method": "loldu", "steps": 2, "overwrite": True}))
    assert result.steps_done == 2 and json.loads((out / "config.json").read_text())["method"] == "loldu"
    assert (out / "notes.txt").read_text() == "mine"  # overwrite removes only the run's own files


class Recorder(TrainCallback):
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.progress: list[Progress] = []

    def on_start(self, config, total_steps, num_trainable):
        self.events.append(("start", total_steps, num_trainable, config.resolution))

    def on_step(self, progress):
        self.progress.append(progress)

    def on_samples(self, step, images, grid_path):
        self.events.append(("samples", step, len(images), Path(grid_path).is_file()))

    def on_end(self, result):
        self.events.append(("end", result.steps_done))


def test_callbacks_see_steps_and_samples(fast):
    recorder = Recorder()
    result = train(
        TrainConfig(
            **{
                **fast,
                "method": "svfit",
                "steps": 4,
                "validation_every": 2,
                "lr_scheduler": "linear",
                "validation_prompts": ["a {token} {class_noun}"],
            }
        ),
        [recorder],
    )
    start = ("start", 4, result.num_trainable, fast["resolution"])
    assert recorder.events == [start, ("samples", 2, 1, True), ("samples", 4, 1, True), ("end", 4)]
    steps = recorder.progress
    assert [p.step for p in steps] == [1, 2, 3, 4] and all(p.total_steps == 4 for p in steps)
    assert [p.lr for p in steps] == pytest.approx([1e-2 * (1 - s / 4) for s in range(1, 5)])  # linear decay to 0
    assert all(p.loss > 0 and p.eta >= 0 for p in steps) and steps[-1].eta == 0
    assert all(a.elapsed < b.elapsed for a, b in zip(steps, steps[1:]))
    assert len(result.samples) == 2


def test_cancel_before_the_first_step(fast):
    cancel = threading.Event()
    cancel.set()
    result = train(TrainConfig(**{**fast, "method": "svfit"}), cancel=cancel)
    assert isinstance(result, TrainResult) and result.cancelled and result.steps_done == 0
    assert Path(result.adapter_path).is_file() and result.eval_loss_end == result.eval_loss_start


def test_run_failing_before_its_first_checkpoint_does_not_block_a_rerun(fast, monkeypatch):
    """A crash at the first step leaves nothing to resume: its config.json and log.jsonl go, a plain rerun starts."""
    import personalize.training.trainer as trainer_module

    out = Path(fast["output_dir"])
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    original = trainer_module.Trainer.optimiser_step

    def crash(self, step):
        raise RuntimeError("the first step failed")

    monkeypatch.setattr(trainer_module.Trainer, "optimiser_step", crash)
    with pytest.raises(RuntimeError, match="the first step failed"):
        train(TrainConfig(**{**fast, "validation_every": 2}))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the user's file stays
    monkeypatch.setattr(trainer_module.Trainer, "optimiser_step", original)
    assert train(TrainConfig(**fast)).steps_done == fast["steps"]


def test_run_failing_after_a_checkpoint_keeps_it_for_resume(fast, monkeypatch):
    import personalize.training.trainer as trainer_module

    original = trainer_module.Trainer.optimiser_step

    def crash_at_3(self, step):
        if step == 2:
            raise RuntimeError("step 3 failed")
        return original(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "optimiser_step", crash_at_3)
    with pytest.raises(RuntimeError, match="step 3 failed"):
        train(TrainConfig(**{**fast, "checkpoint_every": 2}))
    monkeypatch.setattr(trainer_module.Trainer, "optimiser_step", original)
    assert train(TrainConfig(**{**fast, "checkpoint_every": 2, "resume": True})).resumed_from == 2


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, photos, class_dir):
    """A run of 4 steps with EMA and checkpoints at steps 2 and 4 (copied by each test that damages one)."""
    folder = tmp_path_factory.mktemp("checkpointed") / "run"
    settings = {
        "instance_images": str(photos),
        "output_dir": str(folder),
        "base_model": "tiny",
        "steps": 4,
        "lr": 1e-2,
        "prior": "none",
        "class_data_dir": str(class_dir),
        "sample_steps": 2,
        "validation_every": 0,
        "checkpoint_every": 2,
        "eval_timesteps": 2,
        "resolution": 32,
        "ema_decay": 0.9,
    }
    train(TrainConfig(**settings))
    return settings


def copy_run(settings: dict, folder: Path) -> dict:
    shutil.copytree(settings["output_dir"], folder)
    return {**settings, "output_dir": str(folder)}


def evil_pickle(path: Path) -> None:
    """A pickle that would run a command when loaded unsafely."""
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path.write_bytes(pickle.dumps(Evil()))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "ema.safetensors": (truncate, "Error while deserializing"),
    "optimizer.pt": (truncate, "PytorchStreamReader failed reading zip archive"),
    "state.json": (lambda p: p.write_text("{garbage"), "Expecting property name"),
    "rng_0.pt": (evil_pickle, "refused unread, as loading it could run code"),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_resume_names_a_damaged_file_and_uses_the_checkpoint_before(checkpointed, tmp_path, caplog, name):
    settings = copy_run(checkpointed, tmp_path / "run")
    damage, reason = DAMAGE[name]
    damaged = tmp_path / "run" / "checkpoints" / "step_000004" / name
    damage(damaged)
    with caplog.at_level(logging.WARNING, logger="personalize.training.checkpoint"):
        result = train(TrainConfig(**{**settings, "steps": 5, "resume": True}))
    warnings = [r.getMessage() for r in caplog.records]
    assert f"checkpoint file '{damaged}' is damaged (" in warnings[0] and reason in warnings[0]
    assert "weights_only" not in caplog.text
    assert warnings[1].startswith(f"resuming from {tmp_path / 'run' / 'checkpoints' / 'step_000002'}, the latest")
    assert result.resumed_from == 2 and result.steps_done == 5


def test_resume_with_every_checkpoint_damaged_is_one_line(checkpointed, tmp_path):
    settings = copy_run(checkpointed, tmp_path / "run")
    for step in ("step_000002", "step_000004"):
        evil_pickle(tmp_path / "run" / "checkpoints" / step / "rng_0.pt")
    config = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(UserError, match=r"checkpoint file '.*step_000004/rng_0\.pt' is damaged .*no earlier checkpoint reads") as info:
        train(TrainConfig(**{**settings, "steps": 6, "resume": True}))
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    assert (tmp_path / "run" / "config.json").read_text() == config  # nothing rewritten


def test_resume_with_a_damaged_config_names_it(checkpointed, tmp_path):
    settings = copy_run(checkpointed, tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text("not json")
    with pytest.raises(UserError, match=r"'.*run/config\.json' is damaged \(Expecting value.*overwrite \(--overwrite\)$"):
        train(TrainConfig(**{**settings, "steps": 6, "resume": True}))


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(checkpointed, tmp_path):
    settings = copy_run(checkpointed, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"with steps 3: its checkpoint step_000004 is at step 4; set steps to 4 or more$"):
        train(TrainConfig(**{**settings, "steps": 3, "resume": True}))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
