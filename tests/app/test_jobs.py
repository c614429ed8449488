"""The background training job: progress recording, one job at a time, clean stop, failures recorded."""

from __future__ import annotations

import threading

import pytest

from app.jobs import TrainingJobs
from app.workspace import DONE, FAILED, STOPPED, Workspace
from personalize import attach
from personalize.errors import UserError
from personalize.models import tiny_unet
from personalize.train import Progress, TrainConfig, TrainResult
from tests.app.test_workspace import make_images, new_concept


class ScriptedTrainer:
    """Stands in for personalize.train.train: reports `steps` steps, waiting for `release` after the first."""

    def __init__(self, steps=4, fail=None):
        self.steps, self.fail = steps, fail
        self.release = threading.Event()
        self.first_step = threading.Event()

    def __call__(self, config, callbacks=(), cancel=None):
        if self.fail is not None:
            raise self.fail
        for cb in callbacks:
            cb.on_start(config, self.steps, 21504)
        done = 0
        for step in range(1, self.steps + 1):
            if cancel is not None and cancel.is_set():
                break
            done = step
            for cb in callbacks:
                cb.on_step(Progress(step, self.steps, 1.0 / step, 1e-4, 0.1 * step, 0.1 * (self.steps - step)))
            if step == 1:
                self.first_step.set()
                self.release.wait(10)
        for cb in callbacks:
            cb.on_samples(done, [], f"{config.output_dir}/samples/step_{done:06d}.png")
        path = f"{config.output_dir}/adapter.safetensors"
        attach(tiny_unet(), "lora").save(path)
        return TrainResult(path, config.output_dir, done, done < self.steps, 1.0, 0.9, 21504, 0.5)


def setup(tmp_path, trainer):
    space = Workspace(tmp_path / "ws")
    concept = space.create(new_concept(), make_images(tmp_path))
    config = TrainConfig(instance_images=str(space.images_dir(concept.id)), output_dir=str(space.train_dir(concept.id)), base_model="tiny")
    return space, concept, config, TrainingJobs(space, train_fn=trainer)


def test_progress_is_recorded_and_result_saved(tmp_path):
    trainer = ScriptedTrainer()
    trainer.release.set()
    space, concept, config, jobs = setup(tmp_path, trainer)
    jobs.start(concept, config)
    jobs.wait(30)
    state = jobs.snapshot()
    assert state.status == DONE and not state.running
    assert (state.step, state.total, state.num_trainable) == (4, 4, 21504)
    assert [s for s, _ in state.losses] == [1, 2, 3, 4]
    assert state.samples == [(f"{config.output_dir}/samples/step_000004.png", "step 4")]
    stored = space.get(concept.id)
    assert (stored.status, stored.steps_done, stored.num_trainable) == (DONE, 4, 21504)
    assert stored.file_size == space.adapter_path(concept.id).stat().st_size


def test_second_job_is_refused_and_stop_keeps_the_adapter(tmp_path):
    trainer = ScriptedTrainer(steps=50)
    space, concept, config, jobs = setup(tmp_path, trainer)
    jobs.start(concept, config)
    assert trainer.first_step.wait(10)
    assert jobs.busy
    with pytest.raises(UserError, match="already running"):
        jobs.start(concept, config)
    assert jobs.stop()
    trainer.release.set()
    jobs.wait(30)
    assert not jobs.busy and jobs.snapshot().status == STOPPED
    stored = space.get(concept.id)
    assert stored.status == STOPPED and stored.steps_done == 1
    assert space.adapter_path(concept.id).is_file()
    assert not jobs.stop()  # nothing left to stop


@pytest.mark.parametrize(
    "error, shown",
    [
        (UserError("image 'x.png' is corrupt"), "image 'x.png' is corrupt"),
        (RuntimeError("CUDA out of memory"), "RuntimeError: CUDA out of memory"),
        # OS errors are user errors in the app as in the CLI: the path and what to do, not "PermissionError: [Errno 13]"
        (PermissionError(13, "Permission denied", "/data/out"), "'/data/out': permission denied; choose"),
    ],
)
def test_failures_are_recorded_without_traceback(tmp_path, error, shown):
    space, concept, config, jobs = setup(tmp_path, ScriptedTrainer(fail=error))
    jobs.start(concept, config)
    jobs.wait(30)
    state = jobs.snapshot()
    assert state.status == FAILED and shown in state.message and "Traceback" not in state.message
    assert space.get(concept.id).status == FAILED and shown in space.get(concept.id).message


def test_stop_before_the_first_step_leaves_the_concept_untrained(tmp_path):
    from app.workspace import UNTRAINED

    trainer = ScriptedTrainer(steps=3)
    space, concept, config, jobs = setup(tmp_path, trainer)
    jobs.cancel.set()  # the user pressed Stop while the base model was loading

    def stopped_early(config, callbacks=(), cancel=None):
        path = f"{config.output_dir}/adapter.safetensors"
        attach(tiny_unet(), "lora").save(path)
        return TrainResult(path, config.output_dir, 0, True, 1.0, 1.0, 21504, 0.5)

    jobs.train_fn = stopped_early
    jobs.start(concept, config)
    jobs.wait(30)
    stored = space.get(concept.id)
    assert stored.status == UNTRAINED and not stored.usable and "untrained" in jobs.snapshot().message
