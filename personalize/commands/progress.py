"""Training progress in the terminal (the CLI's and the examples' `TrainCallback`): tqdm bars for each
preparation stage and the steps, validation scores as they come, and the metric curve at the end."""

from __future__ import annotations

from tqdm import tqdm

from ..training.callbacks import CLASS_IMAGES_STAGE, Progress, TrainCallback, TrainResult
from ..training.config import TrainConfig

CURVE_COLUMNS = ("fidelity", "alignment", "diversity", "drift")


class TqdmProgress(TrainCallback):
    """A progress bar for each preparation stage (class images, encoding, evaluation) and the training steps."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.stage: str | None = None

    def on_prepare(self, stage: str, done: int, total: int) -> None:
        """One bar per stage; its rate and ETA count from the stage's first report (class images report 0 first)."""
        if self.stage != stage:
            self._close()
            unit = "image" if stage == CLASS_IMAGES_STAGE else "it"
            self.bar, self.stage = tqdm(total=total, initial=done, desc=stage, unit=unit), stage
        else:
            self.bar.update(done - self.bar.n)

    def on_start(self, config: TrainConfig, total_steps: int, num_trainable: int) -> None:
        self._close()
        print(
            f"training {config.method} ({num_trainable:,} trainable parameters) on {len(config.instance_images)} images, "
            f"{total_steps} steps at lr {config.lr:g}, {config.resolution} px -> {config.output_dir}"
        )
        self.bar = tqdm(total=total_steps, desc="train", unit="step")

    def on_step(self, progress: Progress) -> None:
        self.bar.n = progress.step
        self.bar.set_postfix(loss=f"{progress.loss:.4f}", lr=f"{progress.lr:.2g}", refresh=False)
        self.bar.refresh()

    def on_samples(self, step: int, images: list, grid_path: str) -> None:
        tqdm.write(f"step {step}: samples -> {grid_path}")

    def on_scores(self, step: int, scores: dict[str, float], best_step: int | None) -> None:
        shown = ", ".join(f"{name} {scores[name]:.3f}" for name in CURVE_COLUMNS if name in scores)
        tqdm.write(f"step {step}: {shown}" + (f" (best so far: step {best_step})" if best_step is not None else ""))

    def on_end(self, result: TrainResult) -> None:
        """The summary (only the main process gets this call, so a multi-GPU run prints it once)."""
        self._close()
        state = "cancelled" if result.cancelled else "done"
        print(
            f"{state}: {result.steps_done}/{result.total_steps} steps in {result.wall_time:.1f}s; "
            f"eval loss {result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}"
        )
        if result.curves:
            print(curve_table(result.curves, result.best_step, result.selected_by))
        print(f"adapter: {result.adapter_path}")
        if result.best_adapter:
            print(f"best step {result.best_step}: {result.best_adapter}")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.stage = None


def curve_table(curves: list[dict[str, float]], best_step: int | None, rule: str) -> str:
    """The metric curve as a text table, the chosen step marked."""
    columns = [name for name in CURVE_COLUMNS if any(name in point for point in curves)]
    lines = [f"{'step':>8}  " + "  ".join(f"{name:>9}" for name in columns)]
    for point in curves:
        values = "  ".join(f"{point[name]:9.3f}" if name in point else f"{'-':>9}" for name in columns)
        mark = f"  <- best ({rule})" if point["step"] == best_step else ("  (base model)" if point["step"] == 0 else "")
        lines.append(f"{point['step']:>8}  {values}{mark}")
    return "\n".join(lines)
