"""The training run: prepare (model, prior images, cached conditioning and latents, adapter,
optimiser), loop over optimiser steps, and finish (adapter, evaluation, result).

accelerate places everything on the device, runs the UNet under fp16/bf16 autocast with the
trainable tensors kept in float32, accumulates gradients and, under `accelerate launch`, wraps
the UNet in DDP. Only the main process writes files and calls the callbacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import shutil
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, make_writable_dir, remove_empty_dirs, write_json_atomic
from ..data import many_images_note, validate_instance_images
from ..errors import UserError
from ..io import saved_step
from ..models import load_pipeline
from . import checkpoint as ckpt
from . import text_side
from .buckets import BucketedLatents, bucket_sizes, encode_bucketed, granularity
from .callbacks import CLASS_IMAGES_STAGE, CallbackList, Progress, TrainCallback, TrainResult, Validation, scores_validations
from .captions import instance_prompts
from .conditioning import Conditioning, encode_prompts, encode_with_grad
from .config import TrainConfig, resolve, tracked
from .ema import AdapterEMA
from .latents import LatentSet, encode_files
from .masks import auto_masks_for, check_masks, mask_files
from .objective import (
    Batch,
    EvalSet,
    dreambooth_loss,
    evaluation_images,
    evaluation_loss,
    min_snr_weights,
    per_sample_mse,
    target_for,
    training_scheduler,
)
from .outputs import (
    ADAPTER_FILE,
    BEST_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    RESULT_FILE,
    SAMPLES_DIR,
    TENSORBOARD_DIR,
    TrainLog,
    check_output_dir,
    clear_run,
    run_files,
)
from .prior import class_images_needed, default_class_dir, ensure_class_images, existing_class_images
from .prodigy import group_scaled
from .samples import render_samples, save_grid
from .selection import best_step
from .text_side import build_adapter, load_for_training, token_notes, trains_text

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NOISE_SEED_STRIDE = 1009  # per-process noise streams: seed * stride + rank
RECENT_LOSSES = 10


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """'auto': fp16 on CUDA (the precision SD checkpoints ship in and inference uses), none elsewhere."""
    if requested != "auto":
        return requested
    return "fp16" if torch.cuda.is_available() and not cpu else "no"


class Trainer:
    """One training run; `train()` builds it and calls `run()`. Inputs are checked in `__init__`,
    before any model is loaded."""

    def __init__(self, config: TrainConfig, callbacks: Sequence[TrainCallback], cancel: threading.Event | None) -> None:
        self.wall_start = time.perf_counter()
        self.config = resolve(config)
        self.cancel = cancel or threading.Event()
        self.instance_files = [str(Path(f).absolute()) for f in validate_instance_images(self.config.instance_images)]
        if note := many_images_note(len(self.instance_files)):
            log.warning(note)
        if note := text_side.prodigy_note(self.config):
            log.warning(note)
        self.prompts = instance_prompts(self.config, self.instance_files)  # one training prompt per photo
        self.masks = mask_files(self.instance_files, self.config.masks)  # read (and checked) before any model loads
        if self.config.masks == "files":
            check_masks(self.instance_files, self.masks, self.config.mask_background_weight)
        self.output_dir = Path(self.config.output_dir).expanduser().resolve()
        self.mixed_precision = resolve_mixed_precision(self.config.mixed_precision, self.config.cpu)
        self.optimizer_cls = self.optimizer_class()
        self.accelerator = self._accelerator()
        self.main = self.accelerator.is_main_process
        self.rank, self.num_processes = self.accelerator.process_index, self.accelerator.num_processes
        self.hooks = CallbackList(callbacks, enabled=self.main)
        self.generator = torch.Generator().manual_seed(self.config.seed * NOISE_SEED_STRIDE + self.rank)
        self.samples: list[str] = []
        # metrics a tracker scores at each validation ([] = no tracking, or no callback that scores)
        self.tracked = tracked(self.config) if any(scores_validations(c) for c in callbacks) else []
        self.curve: list[dict[str, Any]] = []  # per scored validation: step and scores (step 0 = the base model)
        self.best_step: int | None = None
        self.base_class_images: list = []  # the base model's class-prompt images (drift's reference)
        self.created_dirs: list[Path] = []  # folders this run created: removed again if it fails before writing
        self.fresh = False  # a new run (not a resume) owns every run file in output_dir

    # --- preparation ----------------------------------------------------------------------------
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        c = self.config
        if c.mixed_precision == "fp16" and (c.cpu or not torch.cuda.is_available()):
            raise UserError("mixed_precision fp16 needs a CUDA GPU; on this machine use 'bf16' or 'no'")
        if c.report_to == "tensorboard":
            from accelerate.utils import is_tensorboard_available

            if not is_tensorboard_available():
                raise UserError("report_to 'tensorboard' needs the tensorboard package: pip install tensorboard")
        # accelerate keeps one process-wide state; a long-lived process (the app) may train again with
        # another precision, so start from a clean state (the distributed process group is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(
            mixed_precision=self.mixed_precision,
            gradient_accumulation_steps=c.gradient_accumulation_steps,
            cpu=c.cpu,
            log_with="tensorboard" if c.report_to == "tensorboard" else None,
            project_dir=str(self.output_dir),
            # adapter buffers are derived from W0 identically on every process: no per-step broadcast
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )

    def effective(self, resolution: int | None) -> TrainConfig:
        return dataclasses.replace(
            self.config,
            instance_images=self.instance_files,
            output_dir=str(self.output_dir),
            resolution=resolution,
            mixed_precision=self.mixed_precision,
        )

    def prepare_output(self) -> ckpt.Saved | None:
        """Check and (with overwrite) clear the output folder; the checkpoint to resume from (read in full), if any."""
        c = self.config
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise UserError(f"output_dir '{self.output_dir}' is a file; give a folder (it is created if missing)")
        check_output_dir(self.output_dir, self.effective(c.resolution).to_dict(), c.resume, c.overwrite)
        saved = self.checkpoint_to_resume() if c.resume else None  # before anything is written
        self.accelerator.wait_for_everyone()
        if self.main:
            if c.overwrite:
                clear_run(self.output_dir)
            self.created_dirs = make_writable_dir(self.output_dir, "output_dir")  # before any model is loaded
        self.accelerator.wait_for_everyone()
        self.fresh = not c.resume
        return saved

    def checkpoint_to_resume(self) -> ckpt.Saved | None:
        """The latest checkpoint that reads in full (a damaged one is named and the one before used); its step
        must not lie beyond `steps`."""
        c = self.config
        saved = ckpt.usable_checkpoint(self.output_dir / CHECKPOINTS_DIR, ema=c.ema_decay > 0)
        if saved is None:
            log.info("no checkpoint in %s: starting from the first step", self.output_dir / CHECKPOINTS_DIR)
        elif saved.step > c.steps:
            raise UserError(
                f"cannot resume the run in '{self.output_dir}' with steps {c.steps}: its checkpoint {saved.path.name} is at "
                f"step {saved.step}; set steps to {saved.step} or more"
            )
        return saved

    def prepare(self) -> None:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        c, acc = self.config, self.accelerator
        self.saved = self.prepare_output()
        self.resume_from = self.saved.path if self.saved is not None else None
        self.weight_dtype = WEIGHT_DTYPES[self.mixed_precision]
        self.pipe = pipe = load_pipeline(c.base_model, device=acc.device, dtype=self.weight_dtype)
        self.resolution = c.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        if self.resolution % pipe.vae_scale_factor:
            raise UserError(f"resolution {self.resolution} must be a multiple of the VAE's factor {pipe.vae_scale_factor}")
        self.run_config = self.effective(self.resolution)
        self.scheduler = training_scheduler(pipe)
        pipe.unet.requires_grad_(False)
        pipe.vae.requires_grad_(False)

        device = acc.device
        if trains_text(c) and self.num_processes > 1:
            raise UserError("train_text_encoder and token_vectors train on one process for now; run without accelerate launch / torchrun")
        if not c.token_vectors:
            token_notes(getattr(pipe, "tokenizer", None), c.token)
        self.cache_conditioning()
        masks = self.masks
        if c.masks == "auto":
            progress = lambda done, total: self.hooks.on_prepare("masking images", done, total)  # noqa: E731
            masks = auto_masks_for(self.instance_files, masks, c.class_noun, c.mask_model, device, progress)
            check_masks(self.instance_files, masks, c.mask_background_weight)
        self.instance = self.encode(self.instance_files, "encoding images", c.random_flip, masks)
        self.classes = None
        if c.prior == "images":
            class_files = self.class_images()
            if class_files:
                self.classes = self.encode([str(f) for f in class_files], "encoding class images")

        set_seed(c.seed)  # adapter initialisation (LoRA's gaussian A) and anything else drawing from global RNGs
        if self.resume_from is not None:
            self.adapter = load_for_training(pipe, c, self.resume_from / ADAPTER_FILE)
        else:
            self.adapter = build_adapter(pipe, c)
        if trains_text(c):
            self.cache_conditioning()  # through the adapted text side (a learned token, a resumed text encoder)
        for param in self.adapter.parameters():
            param.data = param.data.float()  # trainable tensors stay float32 under mixed precision
        self.ema = AdapterEMA.of(self.adapter, c.ema_decay) if c.ema_decay > 0 else None  # resume loads its state in _run
        if c.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        pipe.unet.train()

        groups = text_side.parameter_groups(self.adapter, c)
        for group in groups:
            group["weight_decay"] = c.weight_decay
        optimizer = self.optimizer_cls(groups, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon)
        self.main_group = text_side.main_group(groups, self.adapter)  # the group progress reports
        name = "constant_with_warmup" if c.lr_scheduler == "constant" and c.lr_warmup_steps else c.lr_scheduler
        self.lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=c.lr_warmup_steps, num_training_steps=c.steps)
        self.model, self.optimizer = acc.prepare(pipe.unet, optimizer)

        self.eval_sets = self.evaluation_sets()

    def cache_conditioning(self) -> None:
        """Encode the prompts once through the text side as it is now: instance prompts (one row per
        distinct prompt), validation prompts, the class prompt (prior) and its drift copies."""
        c, pipe, device = self.config, self.pipe, self.accelerator.device
        distinct = list(dict.fromkeys(self.prompts))
        self.instance_cond, _ = encode_prompts(pipe, distinct, device, self.resolution)  # one row per distinct prompt
        self.prompt_rows = torch.tensor([distinct.index(p) for p in self.prompts])  # photo -> its row
        if c.validation_every and c.validation_prompts:
            self.validation_cond = encode_prompts(pipe, [c.prompt(p) for p in c.validation_prompts], device, self.resolution)
        self.drift_cond = None  # the class prompt once per validation seed: drift compares its images with the base model's
        if "drift" in self.tracked:
            self.drift_cond = encode_prompts(pipe, [c.prompt(c.class_prompt)] * len(c.validation_prompts), device, self.resolution)
        if c.prior != "none":
            self.class_cond, _ = encode_prompts(pipe, [c.prompt(c.class_prompt)], device, self.resolution)
        if c.keep_unconditional:
            self.null_cond, _ = encode_prompts(pipe, [""], device, self.resolution)

    @property
    def text_live(self) -> bool:
        """Whether a text-side tensor trains now: then conditioning is encoded per micro-batch, with gradients."""
        return text_side.text_trains_now(self.adapter)

    def live_conditioning(self, prompts: list[str]) -> Conditioning:
        with self.accelerator.autocast():
            return encode_with_grad(self.pipe, prompts, self.accelerator.device, self.resolution)

    def evaluation_sets(self) -> list[EvalSet]:
        """At most eval_images photos, evenly spaced (unflipped rows), each with its own SDXL size/crop ids;
        one set per image size (aspect buckets)."""
        chosen = evaluation_images(len(self.instance_files), self.config.eval_images)
        sets = []
        for latents, rows in self.instance.groups():
            mine = chosen[torch.isin(chosen, rows)]  # global rows of this size
            if len(mine):
                local = (rows[None, :] == mine[:, None]).nonzero()[:, 1]  # their rows in the set
                conditioning = self.instance_conditioning(mine).with_time_ids(latents.time_ids(local))
                sets.append(
                    EvalSet.build(self.scheduler, latents.means()[local.to(latents.mean.device)], conditioning, self.config.eval_timesteps)
                )
        return sets

    def encode(self, files: list[str], stage: str, flip: bool = False, masks=None) -> LatentSet | BucketedLatents:
        """Latents of `files`: centre squares of the training resolution, or each at its aspect bucket's size."""
        c, pipe, device = self.config, self.pipe, self.accelerator.device
        progress = lambda done, total: self.hooks.on_prepare(stage, done, total)  # noqa: E731
        if c.buckets:
            sizes = bucket_sizes(self.resolution, granularity(pipe))
            return encode_bucketed(pipe.vae, files, sizes, c.eval_batch_size, device, flip, progress, masks)
        return encode_files(pipe.vae, files, (self.resolution, self.resolution), c.eval_batch_size, device, flip, progress, masks)

    def class_images(self) -> list[Path]:
        """The class images this run draws (prior 'images'): no more than it uses, the missing ones generated."""
        c, acc = self.config, self.accelerator
        count = class_images_needed(c.class_images, c.steps, c.batch_size, c.gradient_accumulation_steps, self.num_processes)
        if count < c.class_images:
            log.info("prior 'images': %d step(s) draw %d class image(s); class_images %d is capped there", c.steps, count, c.class_images)
        folder = (
            Path(c.class_data_dir).expanduser()
            if c.class_data_dir
            else default_class_dir(c.base_model, c.prompt(c.class_prompt), self.resolution, c.sample_steps)
        )
        if self.main:
            ensure_class_images(
                self.pipe,
                folder,
                c.prompt(c.class_prompt),
                count,
                self.resolution,
                c.sample_steps,
                c.class_batch_size,
                progress=lambda done, total: self.hooks.on_prepare(CLASS_IMAGES_STAGE, done, total),
                stop=self.cancel.is_set,
            )
        acc.wait_for_everyone()
        return existing_class_images(folder)[:count]

    def optimizer_class(self):
        """Checked before any model is loaded, so a missing package fails fast."""
        if self.config.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise UserError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes (or use 'adamw')") from exc
            return bnb.optim.AdamW8bit
        if self.config.optimizer == "prodigy":
            try:
                from prodigyopt import Prodigy
            except ImportError as exc:
                raise UserError("optimizer 'prodigy' needs prodigyopt: pip install prodigyopt (or use 'adamw')") from exc
            # bias correction and safeguard warm-up: the settings its authors give for diffusion fine-tuning
            return functools.partial(group_scaled(Prodigy), use_bias_correction=True, safeguard_warmup=True)
        return torch.optim.AdamW

    # --- one step ------------------------------------------------------------------------------
    def micro_batch(self, step: int, micro: int) -> Batch:
        c = self.config
        slot = (step * c.gradient_accumulation_steps + micro) * self.num_processes + self.rank  # global micro-batch index
        index = self.instance.batch(slot, c.batch_size, c.seed)
        latents = self.instance.sample(index, self.generator)  # (b, c, h, w)
        conditioning = self.instance_conditioning(index)
        conditioning = conditioning.with_time_ids(self.instance.time_ids(index))  # SDXL: each photo's size/crop
        batch = Batch(latents, conditioning, self.instance.masks(index))
        if self.classes is not None:
            class_index = self.classes.batch(slot, c.batch_size, c.seed + 1)
            batch.class_latents = self.classes.sample(class_index, self.generator)  # (b, c, h, w)
            batch.class_conditioning = self.class_rows(self.classes.time_ids(class_index))
        return batch

    def class_rows(self, time_ids: torch.Tensor) -> Conditioning:
        """The class prompt's conditioning, one row per entry of (b, 6) SDXL `time_ids`."""
        rows = torch.zeros(len(time_ids), dtype=torch.long)
        class_cond = self.live_conditioning([self.config.prompt(self.config.class_prompt)]) if self.text_live else self.class_cond
        return class_cond.take(rows).with_time_ids(time_ids)

    def null_rows(self, time_ids: torch.Tensor) -> Conditioning:
        """The empty prompt's conditioning (what classifier-free guidance contrasts with), one row per entry of (b, 6) `time_ids`."""
        rows = torch.zeros(len(time_ids), dtype=torch.long)
        null_cond = self.live_conditioning([""]) if self.text_live else self.null_cond
        return null_cond.take(rows).with_time_ids(time_ids)

    def instance_conditioning(self, index: torch.Tensor) -> Conditioning:
        """The prompt conditioning of latent rows `index` (mirrored copies follow the originals: row % photos)."""
        photos = index.cpu() % len(self.instance_files)
        if self.text_live:
            return self.live_conditioning([self.prompts[i] for i in photos.tolist()])
        return self.instance_cond.take(self.prompt_rows[photos])

    def loss(self, batch: Batch) -> torch.Tensor:
        c = self.config
        errors, steps, null_errors = [], [], None
        for number, (latents, conditioning, weights) in enumerate(batch.parts(c.mask_background_weight)):
            device = latents.device
            noise = torch.randn(latents.shape, generator=self.generator).to(device)
            if c.noise_offset:
                noise = noise + c.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=self.generator).to(device)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=self.generator).to(device)
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            targets = target_for(self.scheduler, latents, noise, timesteps)
            n = batch.instances
            if number == 0 and c.prior == "model":  # the instance rows again with the class prompt, towards the frozen model
                noisy, timesteps, conditioning, targets, weights = self.with_frozen_rows(
                    self.class_rows, n, noisy, timesteps, conditioning, targets, weights
                )
            if number == 0 and c.keep_unconditional:  # and with the empty prompt, appended last
                noisy, timesteps, conditioning, targets, weights = self.with_frozen_rows(
                    self.null_rows, n, noisy, timesteps, conditioning, targets, weights
                )
            prediction = self.model(noisy.to(self.weight_dtype), timesteps, **conditioning.unet_kwargs()).sample
            part_errors = per_sample_mse(prediction, targets, weights)  # (rows,)
            if number == 0 and c.keep_unconditional:
                part_errors, null_errors, timesteps = part_errors[:-n], part_errors[-n:], timesteps[:-n]
            errors.append(part_errors)
            steps.append(timesteps)
        errors, timesteps = torch.cat(errors), torch.cat(steps)  # instance rows, then class or prior rows
        snr = min_snr_weights(self.scheduler, timesteps, c.snr_gamma) if c.snr_gamma is not None else None
        loss = dreambooth_loss(errors, snr, batch.instances, c.prior_loss_weight)
        return loss if null_errors is None else loss + c.keep_unconditional * null_errors.mean()

    def with_frozen_rows(self, rows_for, n: int, noisy, timesteps, conditioning: Conditioning, targets, weights):
        """The first `n` noisy rows appended again with the conditioning `rows_for(time_ids)` (the class prompt for
        prior 'model', the empty prompt for keep_unconditional); their targets are the frozen model's predictions
        and their loss weights 1."""
        time_ids = conditioning.time_ids[:n] if conditioning.time_ids is not None else torch.zeros(n, 6)
        targets = torch.cat([targets, self.frozen_prediction(rows_for, noisy[:n], timesteps[:n], time_ids)])
        if weights is not None:
            weights = torch.cat([weights, torch.ones_like(weights[:n])])
        return torch.cat([noisy, noisy[:n]]), torch.cat([timesteps, timesteps[:n]]), conditioning.cat(rows_for(time_ids)), targets, weights

    @torch.no_grad()
    def frozen_prediction(self, rows_for, noisy: torch.Tensor, timesteps: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """The base model's own prediction for the conditioning `rows_for(time_ids)` (adapter switched off, text side
        included; no gradient): the target of prior 'model' and keep_unconditional rows."""
        unet = self.accelerator.unwrap_model(self.model)
        with self.adapter.switched_off(), self.accelerator.autocast():
            conditioning = rows_for(time_ids)
            return unet(noisy.to(self.weight_dtype), timesteps, **conditioning.unet_kwargs()).sample.float()

    def token_trains(self) -> bool:
        tokens = getattr(self.adapter, "tokens", None)
        return tokens is not None and any(p.requires_grad for p in tokens.parameters())

    def optimiser_step(self, step: int) -> float:
        c, acc = self.config, self.accelerator
        losses = []
        for micro in range(c.gradient_accumulation_steps):
            with acc.accumulate(self.model):
                loss = self.loss(self.micro_batch(step, micro))
                acc.backward(loss)
                if acc.sync_gradients and c.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.adapter.parameters(), c.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if not acc.optimizer_step_was_skipped:  # fp16 overflow skips the step; keep the schedule in line
            self.lr_scheduler.step()
        if self.ema is not None and acc.sync_gradients and not acc.optimizer_step_was_skipped:
            self.ema.update()
        return acc.reduce(torch.stack(losses).mean(), reduction="mean").item()

    # --- evaluation, samples, checkpoints --------------------------------------------------------
    def averaged(self) -> contextlib.AbstractContextManager:
        """With ema_decay > 0 the adapter holds the EMA weights in the block (as diffusers' scripts
        validate), the training weights after; otherwise nothing changes."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def evaluate(self, stage: str) -> float:
        if trains_text(self.config):  # the evaluation set's conditioning through the text side as it is now
            with torch.no_grad():
                self.cache_conditioning()
                self.eval_sets = self.evaluation_sets()
        unet = self.accelerator.unwrap_model(self.model)
        was_training = unet.training
        unet.eval()
        try:
            return evaluation_loss(
                self.eval_sets,
                unet,
                self.scheduler,
                self.config.eval_batch_size,
                self.accelerator.autocast,
                progress=lambda done, total: self.hooks.on_prepare(stage, done, total),
            )
        finally:
            unet.train(was_training)

    def render(self, conditioning: tuple[Conditioning, Conditioning]) -> list:
        """One image per row of (positive, negative) conditioning, row i with seed `seed + i`."""
        c = self.config
        positive, negative = conditioning
        return render_samples(
            self.pipe,
            positive,
            negative,
            c.seed,
            self.resolution,
            c.sample_steps,
            c.validation_guidance,
            self.accelerator.autocast,
            c.class_batch_size,
        )

    def validate(self, step: int) -> None:
        """Render the validation prompts (and, with drift tracked, the class prompt on the same seeds),
        save the grid, and let a tracker score them. Step 0 is the base model, before training."""
        c = self.config
        if not (c.validation_every and c.validation_prompts) or not self.main:
            return
        started = time.perf_counter()
        with self.averaged():
            if self.text_live:
                self.cache_conditioning()  # the prompts through the text side as trained so far
            images = self.render(self.validation_cond)
            class_images = self.render(self.drift_cond) if self.drift_cond is not None else []
        render_seconds = time.perf_counter() - started
        path = save_grid(images, self.output_dir / SAMPLES_DIR / f"step_{step:06d}.png")
        self.samples.append(str(path))
        self.log.write({"step": step, "event": "samples", "path": str(path)})
        self.log.images(step, images)
        self.hooks.on_samples(step, images, str(path))
        if self.tracked:
            self.score(step, images, class_images, render_seconds)

    def score(self, step: int, images: list, class_images: list, render_seconds: float) -> None:
        """Ask the callbacks (a metric tracker) to score one validation; log the scores, update the best
        step, and keep the adapter of a new best step in best/."""
        c = self.config
        if step == 0:
            self.base_class_images = class_images
        validation = Validation(
            step=step,
            metrics=self.tracked,
            images=images,
            prompts=[c.prompt(p) for p in c.validation_prompts],
            instance_images=self.instance_files,
            token=c.token,
            class_prompt=c.prompt(c.class_prompt),
            class_images=class_images,
            base_class_images=self.base_class_images,
        )
        started = time.perf_counter()
        self.hooks.on_validation(validation)
        if not validation.scores:
            return  # no tracker among the callbacks
        scores = {name: float(value) for name, value in validation.scores.items()}
        self.curve.append({"step": step, **scores})
        self.best_step = best_step(self.curve, c.select_by, c.drift_limit)
        if self.best_step == step:
            with self.averaged():
                self.adapter.save(self.output_dir / BEST_DIR / ADAPTER_FILE, metadata=self.adapter_metadata(step))
        record = {"step": step, "event": "scores", **scores, "best_step": self.best_step}
        self.log.write({**record, "render_seconds": render_seconds, "score_seconds": time.perf_counter() - started})
        self.hooks.on_scores(step, scores, self.best_step)

    def base_class_renders(self) -> list:
        """The base model's class-prompt images on the validation seeds (the reference of drift)."""
        if self.drift_cond is None or not self.main:
            return []
        with self.adapter.switched_off():
            if trains_text(self.config):
                self.cache_conditioning()  # the class prompt through the base text encoder(s)
            images = self.render(self.drift_cond)
        if trains_text(self.config):
            self.cache_conditioning()
        return images

    def restore_curve(self, resumed_from: int) -> None:
        """On resume: the scores logged up to the checkpoint, the best step among them, and best/ checked
        against them (a crash after a later validation may have left that later step's adapter there)."""
        c = self.config
        self.curve = [
            {k: v for k, v in r.items() if k not in ("event", "best_step", "render_seconds", "score_seconds")}
            for r in self.log.records("scores")
        ]
        self.best_step = best_step(self.curve, c.select_by, c.drift_limit)
        best_file = self.output_dir / BEST_DIR / ADAPTER_FILE
        if self.best_step is None:
            best_file.unlink(missing_ok=True)  # nothing up to the checkpoint was chosen: any file is a later step's
            return
        if saved_step(best_file) == self.best_step:
            return
        kept = self.output_dir / CHECKPOINTS_DIR / ckpt.checkpoint_name(self.best_step)
        source = kept / (ckpt.EMA_ADAPTER_FILE if self.ema is not None else ADAPTER_FILE)  # the weights validation used
        if source.is_file():
            with atomic_path(best_file) as tmp:
                shutil.copyfile(source, tmp)
            return
        log.warning("best/: the adapter of step %d was not kept (its checkpoint is pruned); the next best step replaces it", self.best_step)
        best_file.unlink(missing_ok=True)

    def adapter_metadata(self, step: int) -> dict[str, Any]:
        c = self.run_config
        return {
            "token": c.token,
            "class_noun": c.class_noun,
            "instance_prompt": c.prompt(c.instance_prompt),
            "captions": {Path(f).name: p for f, p in zip(self.instance_files, self.prompts) if p != c.prompt(c.instance_prompt)},
            "base_model": c.base_model,
            "steps": step,
            "train_config": c.to_dict(),
        }

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        acc, folder = self.accelerator, self.output_dir / CHECKPOINTS_DIR
        staging = ckpt.staging_dir(folder, step)
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt.write_rng(staging, self.rank, self.generator)
        acc.wait_for_everyone()
        if self.main:
            path = ckpt.finish_checkpoint(
                staging,
                folder,
                step,
                self.adapter,
                self.adapter_metadata(step),
                self.optimizer,
                self.lr_scheduler,
                acc.scaler,
                state,
                self.config.checkpoints_keep,
                self.ema,
            )
            self.log.write({"step": step, "event": "checkpoint", "path": str(path)})
        acc.wait_for_everyone()

    def non_finite_message(self, step: int, loss: float) -> str:
        """Why the run stopped; nothing is saved after a non-finite step, so earlier files stay good."""
        c = self.config
        found = ckpt.latest_checkpoint(self.output_dir / CHECKPOINTS_DIR)
        kept = f"the last good checkpoint is {found} (continue with resume)" if found else "no checkpoint was saved yet"
        return (
            f"training stopped at step {step}: the loss is {loss} (not a finite number), so no adapter was saved; "
            f"{kept}; try a lower lr (now {c.lr:g}) or mixed_precision 'no' or 'bf16'"
        )

    # --- the run ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._run()
        except BaseException:
            if self.main:
                self.discard_unfinished()
                remove_empty_dirs(self.created_dirs)  # a run that fails before writing leaves no empty folder
            raise

    def discard_unfinished(self) -> None:
        """A new run that fails before its first checkpoint has nothing to resume: its files (config.json,
        log.jsonl, samples) are removed, so that a plain rerun is not refused as 'already holds a training run'."""
        saved = ckpt.list_checkpoints(self.output_dir / CHECKPOINTS_DIR) or (self.output_dir / ADAPTER_FILE).exists()
        if not self.fresh or saved:
            return
        files = run_files(self.output_dir)
        for path in files:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        if files:
            log.warning("the run failed before its first checkpoint: removed its %s", ", ".join(p.name for p in files))

    def _run(self) -> TrainResult:
        self.prepare()
        c, acc = self.config, self.accelerator
        step, train_time_before = 0, 0.0
        if self.resume_from is not None:
            state = ckpt.load_training_state(self.saved, self.optimizer, self.lr_scheduler, acc.scaler)
            step, train_time_before, eval_start = state["step"], state["train_time"], state["eval_loss_start"]
            if self.ema is not None:
                self.ema.load_state_dict(self.saved.ema)
            if not ckpt.read_rng(self.saved, self.rank, self.generator):
                log.warning("checkpoint %s has no random state for process %d; its noise will differ", self.resume_from, self.rank)
            log.info("resuming from %s (step %d of %d)", self.resume_from, step, c.steps)
            self.saved = None  # restored: its tensors need not stay in memory
        else:
            eval_start = self.evaluate("evaluation before training")
        resumed_from = step if self.resume_from is not None else None
        tracker = None
        if self.main:
            if c.report_to == "tensorboard":
                acc.init_trackers(TENSORBOARD_DIR, config=_scalar_config(self.run_config.to_dict()))
                tracker = acc.get_tracker("tensorboard")
            self.log = TrainLog(self.output_dir, resumed_from, tracker)
            write_json_atomic(self.output_dir / CONFIG_FILE, self.run_config.to_dict())
            if resumed_from is None:
                self.log.write({"step": 0, "event": "eval", "eval_loss": eval_start})
        self.hooks.on_start(self.run_config, c.steps, self.adapter.num_trainable)
        if self.tracked and self.main:
            if resumed_from is None:
                self.validate(0)  # the base model's images: the reference of every curve
            else:
                self.base_class_images = self.base_class_renders()
                self.restore_curve(resumed_from)

        loop_start, first_step = time.perf_counter(), step
        recent: deque[float] = deque(maxlen=RECENT_LOSSES)
        saved_steps: set[int] = {step} if self.resume_from is not None else set()
        cancelled = False

        def state() -> dict[str, Any]:
            return {
                "total_steps": c.steps,
                "eval_loss_start": eval_start,
                "method": c.method,
                "train_time": train_time_before + time.perf_counter() - loop_start,
                "num_processes": self.num_processes,
            }

        try:
            while step < c.steps:
                if c.token_vectors and c.token_steps and step >= c.token_steps and self.token_trains():
                    text_side.freeze_token(self.adapter)
                    log.info("step %d: the learned token is frozen (token_steps)", step)
                    self.cache_conditioning()
                if self.main and self.cancel.is_set():
                    acc.set_trigger()
                if acc.check_trigger():
                    cancelled = True
                    break
                loss = self.optimiser_step(step)
                if not math.isfinite(loss):
                    raise UserError(self.non_finite_message(step + 1, loss))
                step += 1
                recent.append(loss)
                now = time.perf_counter()
                rate = (now - loop_start) / (step - first_step)
                lr = self.lr_scheduler.get_last_lr()[self.main_group]
                progress = Progress(step, c.steps, loss, lr, train_time_before + now - loop_start, rate * (c.steps - step))
                if self.main:
                    self.log.write({"step": step, "loss": loss, "lr": lr, "elapsed": progress.elapsed})
                self.hooks.on_step(progress)
                if c.validation_every and step % c.validation_every == 0 and step < c.steps:
                    self.validate(step)
                if c.checkpoint_every and step % c.checkpoint_every == 0 and step < c.steps:
                    self.save_checkpoint(step, state())
                    saved_steps.add(step)
            if cancelled:
                log.info("training cancelled after step %d of %d", step, c.steps)
            if step not in saved_steps and step > 0:
                self.save_checkpoint(step, state())
        except torch.OutOfMemoryError as exc:
            raise UserError(
                "the GPU ran out of memory; try gradient_checkpointing, mixed_precision fp16, optimizer adamw8bit, "
                "a smaller resolution or batch_size (docs/training.md lists settings for 8 GB)"
            ) from exc
        train_time = train_time_before + time.perf_counter() - loop_start
        return self.finish(step, cancelled, eval_start, train_time, resumed_from, list(recent))

    def finish(
        self, step: int, cancelled: bool, eval_start: float, train_time: float, resumed_from: int | None, recent: list[float]
    ) -> TrainResult:
        c, acc = self.config, self.accelerator
        adapter_path = self.output_dir / ADAPTER_FILE
        if self.main:
            with self.averaged():  # the saved adapter holds the EMA weights (ema_decay > 0)
                self.adapter.save(adapter_path, metadata=self.adapter_metadata(step))
            if not cancelled:
                self.validate(step)
        with self.averaged():
            eval_end = self.evaluate("evaluation after training")
        result = TrainResult(
            adapter_path=str(adapter_path),
            output_dir=str(self.output_dir),
            steps_done=step,
            cancelled=cancelled,
            eval_loss_start=eval_start,
            eval_loss_end=eval_end,
            num_trainable=self.adapter.num_trainable,
            wall_time=time.perf_counter() - self.wall_start,
            method=c.method,
            total_steps=c.steps,
            train_time=train_time,
            resumed_from=resumed_from,
            num_processes=self.num_processes,
            final_loss=sum(recent) / len(recent) if recent else None,
            samples=self.samples,
            config_path=str(self.output_dir / CONFIG_FILE),
            curves=self.curve,
            best_step=self.best_step,
            selected_by=c.select_by,
            best_adapter=str(best) if (best := self.output_dir / BEST_DIR / ADAPTER_FILE).is_file() else None,
        )
        if self.main:
            self.log.write({"step": step, "event": "end", "eval_loss": eval_end, "cancelled": cancelled})
            self.log.close()
            write_json_atomic(self.output_dir / RESULT_FILE, result.to_dict())
        for tracker in acc.trackers:  # not end_training(): it destroys the process group the caller may still use
            tracker.finish()
        acc.wait_for_everyone()
        self.hooks.on_end(result)
        return result


def _scalar_config(values: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard hparams accept only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in values.items()}
