"""The background training job: progress and scores recorded, one job at a time, clean stop, failures recorded, continuing a run."""

from __future__ import annotations

import json
import threading

import pytest

from app.jobs import JobState, TrainingJobs, _Recorder, continue_config
from app.workspace import DONE, FAILED, STOPPED, Workspace
from personalize import attach
from personalize.atomic import write_json_atomic
from personalize.errors import UserError
from personalize.models import tiny_unet
from personalize.train import Progress, TrainConfig, TrainResult, effective_config
from personalize.training.callbacks import CLASS_IMAGES_STAGE, CallbackList
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
        hooks = CallbackList(callbacks, enabled=True)  # as the trainer calls them
        hooks.on_start(config, self.steps, 21504)
        done = 0
        for step in range(1, self.steps + 1):
            if cancel is not None and cancel.is_set():
                break
            done = step
            hooks.on_step(Progress(step, self.steps, 1.0 / step, 1e-4, 0.1 * step, 0.1 * (self.steps - step)))
            if step == 1:
                self.first_step.set()
                self.release.wait(10)
        hooks.on_samples(done, [], f"{config.output_dir}/samples/step_{done:06d}.png")
        path = f"{config.output_dir}/adapter.safetensors"
        attach(tiny_unet(), "lora").save(path)
        return TrainResult(path, config.output_dir, done, done < self.steps, 1.0, 0.9, 21504, 0.5)


def setup(tmp_path, trainer):
    space = Workspace(tmp_path / "ws")
    concept = space.create(new_concept(), make_images(tmp_path))
    config = TrainConfig(
        instance_images=str(space.images_dir(concept.id)),
        output_dir=str(space.train_dir(concept.id)),
        base_model="tiny",
        track_metrics="none",
    )
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


def test_scores_reach_the_snapshot_and_the_tracker_is_handed_to_the_trainer(tmp_path, monkeypatch):
    class Tracker:  # stands in for metrics.tracking.MetricTracker (its embedders take seconds to load)
        def __init__(self, config):
            self.config = config

    class ScoringTrainer(ScriptedTrainer):
        def __call__(self, config, callbacks=(), cancel=None):
            trackers.extend(cb for cb in callbacks if isinstance(cb, Tracker))
            for step, best in ((0, None), (2, 2), (4, 2)):
                CallbackList(callbacks, enabled=True).on_scores(step, {"fidelity": 0.5 + step / 10, "alignment": 0.3}, best)
            return super().__call__(config, callbacks, cancel)

    trackers = []
    monkeypatch.setattr("app.jobs.tracker_for", Tracker)
    trainer = ScoringTrainer()
    trainer.release.set()
    _, concept, config, jobs = setup(tmp_path, trainer)
    jobs.start(concept, config)
    jobs.wait(120)  # saving the adapter builds the tiny UNet: slow on a busy machine
    assert [tracker.config for tracker in trackers] == [config]
    state = jobs.snapshot()
    assert [point["step"] for point in state.curves] == [0, 2, 4] and state.best_step == 2
    assert state.curves[1] == {"step": 2, "fidelity": 0.7, "alignment": 0.3}
    state.curves[0]["fidelity"] = -1.0  # a snapshot is a copy
    assert jobs.snapshot().curves[0]["fidelity"] == 0.5


def test_preparation_shows_its_stage_count_and_eta(tmp_path):
    """Before the first step (class images take minutes) the progress line names the stage with its count, the
    ETA from the stage's own rate and the time since the job started, not 'step 0/?'; then the steps."""
    from app.tabs.train import job_status, progress_html

    _, concept, config, jobs = setup(tmp_path, ScriptedTrainer())
    jobs.state = JobState(concept.id, concept.name)
    ticks = iter([100.0, 110.0, 111.0, 112.0])
    recorder = _Recorder(jobs, clock=lambda: next(ticks))
    recorder.on_prepare(CLASS_IMAGES_STAGE, 0, 30)  # at 100 s
    assert jobs.snapshot().phase_eta is None  # nothing done yet: no rate
    recorder.on_prepare(CLASS_IMAGES_STAGE, 4, 30)  # 4 images in 10 s: 26 more take 65 s
    state = jobs.snapshot()
    assert (state.phase, state.phase_done, state.phase_total, state.phase_eta) == (CLASS_IMAGES_STAGE, 4, 30, 65.0)
    line = progress_html(state, now=state.started + 75)
    assert "generating class images 4/30, ETA 1:05" in line and "elapsed 1:15" in line and "width:13.3%" in line
    assert "step 0" not in line and "generating class images 4/30, ETA 1:05" in job_status(state)

    recorder.on_prepare("encoding class images", 4, 30)  # a new stage: its rate starts again
    assert jobs.snapshot().phase_eta is None and "encoding class images 4/30, ETA –" in progress_html(jobs.snapshot())
    recorder.on_start(config, 30, 21504)
    line = progress_html(jobs.snapshot())
    assert "step 0/30 · elapsed 0:00 · training" in line and "training" in job_status(jobs.snapshot())


def trained_run(tmp_path, checkpoint: int | None = 5, steps: int = 10):
    """A concept whose run stopped at `checkpoint` of `steps`: its saved config.json and checkpoint folder."""
    space = Workspace(tmp_path / "ws")
    concept = space.create(new_concept(status=STOPPED, steps=steps, steps_done=checkpoint or 0, adapter_step=3), make_images(tmp_path))
    run = space.train_dir(concept.id)
    saved = effective_config(
        instance_images=str(space.images_dir(concept.id)), output_dir=str(run), base_model="tiny", steps=steps, track_metrics="none"
    )
    write_json_atomic(run / "config.json", saved.to_dict())
    if checkpoint is not None:
        write_json_atomic(run / "checkpoints" / f"step_{checkpoint:06d}" / "state.json", {"step": checkpoint})
    return space, space.get(concept.id)


def test_continue_config_is_the_saved_config_with_resume(tmp_path):
    space, concept = trained_run(tmp_path)
    config = continue_config(space, concept, 12)
    assert config.resume and config.steps == 12 and config.output_dir == str(space.train_dir(concept.id))
    saved = json.loads((space.train_dir(concept.id) / "config.json").read_text())
    assert {k: v for k, v in config.to_dict().items() if k not in ("resume", "steps")} == {
        k: v for k, v in saved.items() if k not in ("resume", "steps")
    }
    for steps, shown in ((5, "5"), (3, "3"), (None, "nothing")):
        with pytest.raises(UserError, match=rf"total steps must be a whole number larger than 5, the step .*; got {shown}$"):
            continue_config(space, concept, steps)
    space, concept = trained_run(tmp_path / "none", checkpoint=None)
    with pytest.raises(UserError, match="'My Dog' has no checkpoint saved yet: train it again"):
        continue_config(space, concept, 12)


def test_continue_run_trains_again_and_is_refused_while_a_job_runs(tmp_path):
    space, concept = trained_run(tmp_path)
    seen = []
    trainer = ScriptedTrainer(steps=12)

    def resumed(config, callbacks=(), cancel=None):
        seen.append(config)
        return trainer(config, callbacks, cancel)

    jobs = TrainingJobs(space, train_fn=resumed)
    jobs.continue_run(concept.id, 12)
    assert trainer.first_step.wait(10)
    assert space.get(concept.id).status == "training"
    with pytest.raises(UserError, match="already running"):  # one job at a time; the concept is left as it is
        jobs.continue_run(concept.id, 20)
    trainer.release.set()
    jobs.wait(120)  # saving the adapter builds the tiny UNet: slow on a busy machine
    (config,) = seen
    assert config.resume and config.steps == 12
    stored = space.get(concept.id)
    assert (stored.status, stored.steps, stored.steps_done, stored.adapter_step) == (DONE, 12, 12, None)
    assert jobs.snapshot().message.startswith("Training finished after 12 steps")
