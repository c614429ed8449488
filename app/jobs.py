"""The background training job: one at a time, observed by the UI through snapshots, stopped by an Event.

`TrainingJobs.start` runs `personalize.train.train` in a thread with a callback that records progress
(preparation stages with their count and ETA, e.g. class images; then step, loss, ETA), validation
images and the metric tracker's scores; the Train tab polls `snapshot()`.
A second start while a job runs is refused with a message. When the run ends, its result is written
into the concept's concept.json (status, steps done, parameter count, file size).
`TrainingJobs.continue_run` continues a concept's run from its latest checkpoint with more steps: the
run's saved config with resume, as `personalize train --config <run>/config.json --resume --steps N`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from metrics.tracking import tracker_for
from personalize.errors import USER_ERRORS, UserError, user_message
from personalize.io import adapter_info
from personalize.train import Progress, TrainCallback, TrainConfig, TrainResult, effective_config, train
from personalize.training.outputs import CONFIG_FILE

from .workspace import DONE, FAILED, STOPPED, TRAINING, UNTRAINED, Concept, Workspace

log = logging.getLogger(__name__)

RUNNING = "running"


@dataclass
class JobState:
    """What the Train tab shows about the current (or last) job."""

    concept_id: str
    concept_name: str
    status: str = RUNNING  # running | done | stopped | failed
    phase: str = "loading the base model"  # what the job does right now, before steps start
    phase_done: int = 0  # the preparation stage's progress (e.g. class images made), when it counts
    phase_total: int = 0  # 0: the phase has no count
    phase_eta: float | None = None  # seconds left in the preparation stage (None: not known yet)
    step: int = 0
    total: int = 0
    loss: float | None = None
    elapsed: float = 0.0
    eta: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (grid path, caption)
    curves: list[dict] = field(default_factory=list)  # per scored validation: {"step": s, "fidelity": ..., ...}
    best_step: int | None = None  # the validation step the metric tracker chose so far
    num_trainable: int | None = None
    message: str = ""  # final message (result or error)
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    def set_phase(self, phase: str, done: int = 0, total: int = 0, eta: float | None = None) -> None:
        self.phase, self.phase_done, self.phase_total, self.phase_eta = phase, done, total, eta


def stage_eta(elapsed: float, done: int, left: int) -> float | None:
    """Seconds left in a stage that did `done` units in `elapsed` seconds and has `left` to do."""
    return elapsed / done * left if done > 0 else None


def busy_message(running: JobState) -> str:
    """Why a second job cannot start while `running` runs."""
    return (
        f"a training job is already running (concept '{running.concept_name}', step "
        f"{running.step}/{running.total or '?'}); wait for it to finish or press Stop"
    )


class _Recorder(TrainCallback):
    """Copies trainer callbacks into the shared JobState under the job's lock."""

    def __init__(self, jobs: "TrainingJobs", clock: Callable[[], float] = time.monotonic) -> None:
        self.jobs, self.clock = jobs, clock
        self.stage: str | None = None
        self.stage_start, self.stage_from = 0.0, 0  # when the current stage was first reported, and its count then

    def on_prepare(self, stage: str, done: int, total: int) -> None:
        """A preparation stage's count and ETA (the rate counts from the stage's first report)."""
        now = self.clock()
        if stage != self.stage:
            self.stage, self.stage_start, self.stage_from = stage, now, done
        eta = stage_eta(now - self.stage_start, done - self.stage_from, total - done)
        with self.jobs.lock:
            self.jobs.state.set_phase(stage, done, total, eta)

    def on_start(self, config: TrainConfig, total_steps: int, num_trainable: int) -> None:
        with self.jobs.lock:
            state = self.jobs.state
            state.total, state.num_trainable = total_steps, num_trainable
            state.set_phase("training")

    def on_step(self, progress: Progress) -> None:
        with self.jobs.lock:
            state = self.jobs.state
            state.step, state.total = progress.step, progress.total_steps
            state.loss, state.elapsed, state.eta = progress.loss, progress.elapsed, progress.eta
            state.losses.append((progress.step, float(progress.loss)))
            if progress.step >= progress.total_steps:
                state.set_phase("finishing: validation images, evaluation loss, saving the adapter")

    def on_samples(self, step: int, images: list, grid_path: str) -> None:
        with self.jobs.lock:
            self.jobs.state.samples.append((str(grid_path), f"step {step}"))

    def on_scores(self, step: int, scores: dict[str, float], best_step: int | None) -> None:
        with self.jobs.lock:
            state = self.jobs.state
            state.curves.append({"step": step, **scores})
            state.best_step = best_step


def continue_config(workspace: Workspace, concept: Concept, steps: int | None) -> TrainConfig:
    """The config that continues `concept`'s run from its latest checkpoint up to `steps` in total:
    the run's saved config.json with resume (what `personalize train --config <run>/config.json
    --resume --steps N` runs). Refuses a run without a checkpoint and a total not above its step."""
    checkpoint = workspace.latest_checkpoint(concept.id)
    if checkpoint is None:
        raise UserError(f"'{concept.name}' has no checkpoint saved yet: train it again")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= checkpoint:
        raise UserError(
            f"total steps must be a whole number larger than {checkpoint}, the step of the latest checkpoint of "
            f"'{concept.name}'; got {'nothing' if steps is None else steps}"
        )
    train_dir = workspace.train_dir(concept.id)
    return effective_config(train_dir / CONFIG_FILE, resume=True, steps=steps, output_dir=str(train_dir))


class TrainingJobs:
    """Runs at most one training job; `train_fn` is `personalize.train.train` (injectable for tests)."""

    def __init__(self, workspace: Workspace, train_fn: Callable[..., TrainResult] = train) -> None:
        self.workspace = workspace
        self.train_fn = train_fn
        self.lock = threading.Lock()
        self.state: JobState | None = None
        self.cancel = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        with self.lock:
            return self.state is not None and self.state.running

    def snapshot(self) -> JobState | None:
        """A copy of the current job's state (lists copied), safe to read without the lock."""
        with self.lock:
            if self.state is None:
                return None
            state = self.state
            return replace(state, losses=list(state.losses), samples=list(state.samples), curves=[dict(c) for c in state.curves])

    def start(self, concept: Concept, config: TrainConfig) -> None:
        """Start training `concept` with `config` in the background; refuses while a job runs."""
        with self.lock:
            if self.state is not None and self.state.running:
                raise UserError(busy_message(self.state))
            self.cancel = threading.Event()
            self.state = JobState(concept.id, concept.name)
            self.thread = threading.Thread(target=self._run, args=(concept, config, self.cancel), name="personalize-train", daemon=True)
        self.thread.start()

    def continue_run(self, concept_id: str, steps: int | None) -> Concept:
        """Continue the concept's run from its latest checkpoint to `steps` in total, in the background.

        The concept trains again (status training, then done or stopped as a new run) and generates
        with the continued run's default step afterwards (its best, else its final adapter)."""
        job = self.snapshot()
        if job is not None and job.running:  # checked before the concept is touched; `start` checks again
            raise UserError(busy_message(job))
        concept = self.workspace.get(concept_id)
        config = continue_config(self.workspace, concept, steps)
        before = replace(concept)
        concept.status, concept.steps, concept.message, concept.adapter_step = TRAINING, config.steps, "", None
        self.workspace.save(concept)
        try:
            self.start(concept, config)
        except Exception:
            self.workspace.save(before)
            raise
        return concept

    def stop(self) -> bool:
        """Ask the running job to stop after its current step (the adapter is still saved)."""
        with self.lock:
            if self.state is None or not self.state.running:
                return False
            self.state.set_phase("stopping after the current step")
        self.cancel.set()
        return True

    def wait(self, timeout: float | None = None) -> None:
        thread = self.thread
        if thread is not None:
            thread.join(timeout)

    def _run(self, concept: Concept, config: TrainConfig, cancel: threading.Event) -> None:
        try:
            tracker = tracker_for(config)  # scores the validation images; the trainer keeps the best step's adapter
            callbacks = [_Recorder(self)] + ([tracker] if tracker is not None else [])
            result = self.train_fn(config, callbacks=callbacks, cancel=cancel)
        except USER_ERRORS as exc:
            self._finish(concept.id, FAILED, user_message(exc))
        except Exception as exc:  # the UI shows one line; the log keeps the traceback
            log.exception("training concept %s failed", concept.id)
            self._finish(concept.id, FAILED, f"{type(exc).__name__}: {exc}")
        else:
            self._record(concept.id, result)

    def _record(self, concept_id: str, result: TrainResult) -> None:
        status = (UNTRAINED if result.steps_done == 0 else STOPPED) if result.cancelled else DONE
        try:
            concept = self.workspace.get(concept_id)
        except UserError:  # deleted meanwhile: nothing to record
            concept = None
        if concept is not None:
            concept.status, concept.steps_done = status, result.steps_done
            concept.num_trainable, concept.wall_time = result.num_trainable, result.wall_time
            if os.path.isfile(result.adapter_path):
                concept.file_size = adapter_info(result.adapter_path)["file_size"]
            concept.message = "stopped before the first training step; train it again to use it" if status == UNTRAINED else ""
            self.workspace.save(concept)
        if status == UNTRAINED:
            self._set_final(status, "Training stopped before the first step: the concept is untrained (train it again to use it).")
            return
        verb = "stopped" if result.cancelled else "finished"
        self._set_final(status, f"Training {verb} after {result.steps_done} steps in {result.wall_time:.1f} s; adapter saved.")

    def _finish(self, concept_id: str, status: str, message: str) -> None:
        try:
            concept = self.workspace.get(concept_id)
            if concept.status == TRAINING:
                concept.status, concept.message = status, message
                self.workspace.save(concept)
        except UserError:
            pass
        self._set_final(status, f"Training failed: {message}")

    def _set_final(self, status: str, message: str) -> None:
        with self.lock:
            assert self.state is not None
            self.state.status, self.state.message = status, message
            self.state.set_phase(status)
