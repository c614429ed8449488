"""`TrainConfig`: every training setting with its default and the reason for it.

A config comes from keyword arguments, a TOML file (or the `config.json` of an earlier run) and
command-line flags, in that order of precedence (flags win). `resolve` fills the method's paper
defaults (steps, learning rate) and the base model's sampling steps, and checks every value before
any model is loaded.

Importing this module loads no torch (the CLI builds its flags from `TrainConfig`): the checks that
need the method classes, image and text-encoder code import them when they run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import get_method
from ..base_models import DEFAULT_BASE_MODEL
from ..errors import UserError
from ..prompts import check_seed, check_template

VALIDATION_PROMPTS = [
    "a photo of {token} {class_noun}",
    "a {token} {class_noun} in the jungle",
    "a {token} {class_noun} on the beach",
    "a watercolor painting of {token} {class_noun}",
]
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
# Prodigy (Mishchenko & Defazio 2023) estimates the step size itself; its lr is a multiplier of that estimate, 1.0
# as its authors and the kohya / OneTrainer / SimpleTuner guides set it.
PRODIGY_LR = 1.0
PRIORS = ("images", "model", "none")
MASKS = ("files", "auto", "off")
SCHEDULES = ("constant", "cosine", "linear")
REPORT_TO = ("none", "tensorboard")
# Metrics a tracker can compute at each validation (the metrics package scores them; KID/FID need far more images).
TRACKABLE = ("dino", "dinov2", "clip_i", "clip_t", "vendi", "drift")
EMBEDDER_SETS = ("auto", "default", "tiny", "shapes")
SELECTION_RULES = ("balanced", "fidelity", "alignment", "last")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """DreamBooth-style training of one adapter on a few photos of one subject."""

    instance_images: str | list[str] = field(metadata=_help("a folder or a list of image files of the subject (3-5 typical)"))
    output_dir: str = field(metadata=_help("folder for adapter.safetensors, config.json, result.json, log.jsonl, samples/, checkpoints/"))
    base_model: str = field(
        default=DEFAULT_BASE_MODEL,
        metadata=_help("hub id, diffusers folder, .safetensors/.ckpt file, or a built-in: 'shapes', 'tiny', 'sd15-random'"),
    )
    method: str = field(default="lora", metadata=_help("adapter method (see `personalize methods`)"))
    method_options: dict[str, Any] = field(default_factory=dict, metadata=_help("the method's options, e.g. rank=8 preset=attention"))
    # DreamBooth (Ruiz et al. 2023, §3.2): a rare token bound to the subject, plus its class noun.
    token: str = field(default="sks", metadata=_help("rare identifier token bound to the subject (DreamBooth §3.2)"))
    class_noun: str = field(default="person", metadata=_help("the subject's class, e.g. dog, backpack, person"))
    instance_prompt: str = field(default="a photo of {token} {class_noun}", metadata=_help("training prompt template (DreamBooth §3.2)"))
    # kohya sd-scripts, OneTrainer and ai-toolkit read a caption file per image; <image>.txt is kohya's default extension.
    captions: bool = field(
        default=True,
        metadata=_help(
            "use <image>.txt next to an image as its training prompt ({token}/{class_noun} or the literal token); "
            "images without one use instance_prompt (kohya's caption convention)"
        ),
    )
    class_prompt: str = field(
        default="a photo of {class_noun}", metadata=_help("prompt of the prior-preservation class images (DreamBooth §3.3)")
    )
    steps: int | None = field(default=None, metadata=_help("optimiser steps; default: the method's paper value (docs/training.md)"))
    lr: float | None = field(default=None, metadata=_help("learning rate of the main parameter group; default: the method's paper value"))
    resolution: int | None = field(
        default=None, metadata=_help("training size in px; default: the base model's native size (512 for SD 1.5)")
    )
    # Batch 1: the DreamBooth-LoRA examples of diffusers and kohya train 3-5 images at batch size 1.
    batch_size: int = field(default=1, metadata=_help("instance images per step and process (plus as many class images)"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-batches per optimiser step"))
    # Prior preservation off by default, as in both anchors: diffusers' train_dreambooth_lora.py adds the prior loss
    # only with --with_prior_preservation, kohya sd-scripts only when a regularisation folder (reg_data_dir) is given.
    # A first run then starts in seconds; class images cost minutes (one image = sample_steps UNet passes, twice with
    # guidance). 'images' is DreamBooth's class-specific prior loss (§3.3) on generated class images; 'model' is the
    # variant of OneTrainer, ai-toolkit and SimpleTuner: the frozen model's own prediction on the instance latents with
    # the class prompt is the target, so no class images are generated (one more UNet pass per step).
    prior: str = field(
        default="none",
        metadata=_help(
            "class prior preservation (DreamBooth §3.3): none (off, as diffusers and kohya by default) | images (loss on "
            "generated class images) | model (pull the adapted model's class-prompt prediction on each instance latent "
            "towards the frozen model's; no class images)"
        ),
    )
    # diffusers' --num_class_images default; a run draws at most steps x batch_size x accumulation x processes of them.
    class_images: int = field(
        default=100,
        metadata=_help(
            "class images to generate or reuse with prior 'images' (diffusers' default 100); never more than the run "
            "draws (steps x batch_size x gradient_accumulation_steps x processes)"
        ),
    )
    # Issue 29: with one fixed training prompt nothing tells an adapter whether the subject belongs to the prompt or to
    # every image, and on `shapes` UNet adapters stored it in prompt-independent weights, which classifier-free guidance
    # then cancels (LoRA on a red striped star: judge fidelity 0.58 at guidance 1, 0.00 at 5). Off by default: measured
    # on `shapes` only (BENCHMARKS.md, "Subjects the model can draw"); the shapes recipe turns it on.
    keep_unconditional: float = field(
        default=0.0,
        metadata=_help(
            "weight of a loss keeping the adapted model's empty-prompt prediction on each instance latent at the frozen "
            "model's (0 = off): the subject then lives in the prompt-conditioned part that classifier-free guidance amplifies"
        ),
    )
    prior_loss_weight: float = field(default=1.0, metadata=_help("weight of the prior loss (DreamBooth: lambda = 1)"))
    class_data_dir: str | None = field(
        default=None, metadata=_help("folder of class images; default: a cache shared by runs with the same model, prompt, size")
    )
    class_batch_size: int = field(
        default=4,
        metadata=_help("images per pipeline call when rendering class images and validation samples (diffusers' class-image default 4)"),
    )
    # DPM-Solver++ (Lu et al. 2022) converges in 20-25 steps on a trained model; the random-weight built-ins take 3
    # (models.BUILTIN_SAMPLE_STEPS says why).
    sample_steps: int | None = field(
        default=None,
        metadata=_help(
            "denoising steps for class images and validation samples (DPM-Solver++); default: the base model's "
            "(25; 3 on the random-weight built-ins 'tiny' and 'sd15-random')"
        ),
    )
    validation_prompts: list[str] = field(
        default_factory=lambda: list(VALIDATION_PROMPTS), metadata=_help("fixed prompts rendered at each validation")
    )
    validation_every: int = field(default=100, metadata=_help("render validation samples every N steps and at the end; 0 = off"))
    validation_guidance: float = field(default=7.5, metadata=_help("classifier-free guidance of validation samples (SD's usual 7.5)"))
    checkpoint_every: int = field(default=100, metadata=_help("save a resumable checkpoint every N steps; 0 = only at the end"))
    checkpoints_keep: int = field(default=3, metadata=_help("keep the last K checkpoints"))
    seed: int = field(default=0, metadata=_help("seed of the adapter init, noise, timesteps, data order and validation samples"))
    mixed_precision: str = field(default="auto", metadata=_help("auto (fp16 on CUDA GPUs, none elsewhere) | no | fp16 | bf16"))
    # Off as in both anchors: it trades ~30% speed for memory; docs/training.md turns it on for 8 GB GPUs.
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward to save GPU memory"))
    optimizer: str = field(
        default="adamw",
        metadata=_help(
            "adamw | adamw8bit (needs bitsandbytes) | prodigy (needs prodigyopt; learns its step size: lr defaults to 1.0, "
            "with bias correction and safeguard warm-up on)"
        ),
    )
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1 (Loshchilov & Hutter 2019 default)"))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2 (default)"))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon (default)"))
    weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay (diffusers' DreamBooth-LoRA value)"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (diffusers and kohya default); 0 = off"))
    lr_scheduler: str = field(
        default="constant", metadata=_help("constant | cosine | linear (LoLDU and DreamBooth-LoRA train at constant lr)")
    )
    lr_warmup_steps: int = field(default=0, metadata=_help("linear warm-up steps before the schedule"))
    snr_gamma: float | None = field(
        default=None, metadata=_help("Min-SNR loss weighting gamma (Hang et al. 2023 suggest 5); off by default")
    )
    noise_offset: float = field(default=0.0, metadata=_help("offset noise strength (Guttenberg 2023; 0.05-0.1 typical); off by default"))
    random_flip: bool = field(default=False, metadata=_help("also train on mirrored images (off: subjects are often asymmetric)"))
    # Masked loss as in kohya sd-scripts (--masked_loss) and OneTrainer (masked training): the background does not teach.
    masks: str = field(
        default="files",
        metadata=_help(
            "loss masks: files (<image>.mask.png next to an image, white = subject; images without one train unmasked) | "
            "auto (a segmentation model prompted with class_noun masks the images that have no file) | off"
        ),
    )
    mask_model: str = field(
        default="CIDAS/clipseg-rd64-refined",
        metadata=_help("segmentation model of masks 'auto': a CLIPSeg hub id or folder, or 'tiny' (random weights, for tests)"),
    )
    # OneTrainer's "unmasked weight" default 0.1: at 0 the background gets no gradient at all and drifts freely
    # (the model may paint anything there); a small weight keeps it anchored while the subject dominates.
    mask_background_weight: float = field(
        default=0.1, metadata=_help("loss weight outside the mask (0 = subject only; 1 = no masking); OneTrainer's 0.1")
    )
    # Aspect-ratio buckets (NovelAI 2022; kohya sd-scripts, OneTrainer, SimpleTuner): each photo keeps its shape.
    buckets: bool = field(
        default=False,
        metadata=_help(
            "train each image at its own aspect ratio (buckets of about resolution^2 pixels, sides multiples of 64 px, "
            "one bucket per batch) instead of a centre square crop"
        ),
    )
    # EMA of the trained weights (off, as in diffusers' DreamBooth scripts; kohya and OneTrainer offer it for long runs).
    ema_decay: float = field(
        default=0.0,
        metadata=_help("exponential moving average of the trainable tensors, e.g. 0.999; the saved adapter holds the average; 0 = off"),
    )
    eval_timesteps: int = field(default=8, metadata=_help("timesteps per instance image in the fixed evaluation set"))
    # 16 x 8 timesteps = 128 UNet passes at start and end: a stable mean (runs differ in the 3rd digit) in
    # seconds on a GPU; 500 photos would make it 4000 passes, minutes of silence, for no better estimate.
    eval_images: int = field(default=16, metadata=_help("at most this many instance images (evenly spaced) in the evaluation set"))
    eval_batch_size: int = field(default=4, metadata=_help("batch size of the evaluation and latent encoding passes"))
    report_to: str = field(default="none", metadata=_help("none | tensorboard (log.jsonl is always written)"))
    # The text side (issue 17). diffusers' train_dreambooth_lora.py, kohya sd-scripts and OneTrainer offer text-encoder LoRA;
    # the diffusers "advanced" scripts and invoke-training add pivotal tuning (a new token embedding trained with it).
    train_text_encoder: bool = field(
        default=False,
        metadata=_help("also adapt the text encoder(s) (CLIP attention projections; with text_encoder_layers attention_mlp also fc1/fc2)"),
    )
    text_encoder_parts: str = field(
        default="all", metadata=_help("which text encoders train: all | text_encoder | text_encoder_2 (SDXL has both; comma-separated)")
    )
    text_encoder_method: str = field(default="", metadata=_help("adapter method of the text encoder(s); empty = the UNet's method"))
    text_encoder_options: dict[str, Any] = field(
        default_factory=dict, metadata=_help("the text-encoder method's options, e.g. rank=4 (default: the UNet's options, same method)")
    )
    text_encoder_layers: str = field(
        default="attention", metadata=_help("attention (q/k/v/out projections; diffusers) | attention_mlp (also fc1, fc2; kohya)")
    )
    # diffusers' train_dreambooth_lora.py optimises the text-encoder LoRA at the UNet's --learning_rate.
    text_encoder_lr: float | None = field(
        default=None, metadata=_help("learning rate of the text-encoder adapters; default: the UNet's lr (diffusers' DreamBooth-LoRA)")
    )
    token_vectors: int = field(
        default=0,
        metadata=_help("pivotal tuning: learn the token as this many new embedding vectors (1-4) with the adapters; 0 = off"),
    )
    token_init: str = field(default="", metadata=_help("word whose embedding starts the learned token; empty = class_noun"))
    # diffusers' textual_inversion example trains embeddings at 5e-4.
    token_lr: float = field(default=5e-4, metadata=_help("learning rate of the learned token's vectors (diffusers' textual inversion)"))
    token_steps: int = field(default=0, metadata=_help("train the token only for the first N steps, then freeze it; 0 = all steps"))
    # Metric tracking (issue 19): the validation images scored while training, so the numbers pick the step to keep.
    track_metrics: str = field(
        default="dino,clip_i,clip_t,vendi,drift",
        metadata=_help(
            "metrics scored at each validation (comma-separated: dino, dinov2, clip_i, clip_t, vendi, drift) by the CLI's "
            "and the app's tracker; 'none' = off"
        ),
    )
    track_embedders: str = field(
        default="auto",
        metadata=_help(
            "backbones of the tracked metrics: auto (the shapes judge for 'shapes', tiny models for 'tiny', else "
            "DINO ViT-S/16 and CLIP ViT-B/32) | default | tiny | shapes"
        ),
    )
    select_by: str = field(
        default="balanced",
        metadata=_help(
            "which validation step best/adapter.safetensors keeps: balanced (fidelity x share of the base model's prompt "
            "alignment kept) | fidelity | alignment | last; steps whose drift exceeds drift_limit are passed over"
        ),
    )
    # DreamBooth's language drift: the class prompt's images move away from the base model's. 0.25 = the class images
    # keep 75% cosine similarity to the base model's on the same seeds (BENCHMARKS.md: drift on shapes).
    drift_limit: float = field(
        default=0.25,
        metadata=_help("largest drift (1 - cosine of class-prompt images to the base model's, same seeds) a chosen step may have"),
    )
    resume: bool = field(default=False, metadata=_help("continue from the latest checkpoint in output_dir"))
    overwrite: bool = field(default=False, metadata=_help("replace an earlier run in output_dir (only its own files are removed)"))
    cpu: bool = field(default=False, metadata=_help("train on the CPU even if a GPU is present"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def prompt(self, template: str) -> str:
        return template.format(token=self.token, class_noun=self.class_noun)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def default_of(name: str) -> Any:
    """The default of TrainConfig field `name` (the form and the resume check show and use these)."""
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


DEFAULTS = {
    name: default_of(name)
    for name, f in FIELDS.items()
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
}
# Fields that define what a run learns: a resumed run must agree with the saved config on them.
RUN_DEFINING = (
    "instance_images",
    "base_model",
    "method",
    "method_options",
    "token",
    "class_noun",
    "instance_prompt",
    "captions",
    "class_prompt",
    "lr",
    "resolution",
    "batch_size",
    "gradient_accumulation_steps",
    "prior",
    "class_images",
    "prior_loss_weight",
    "keep_unconditional",
    "seed",
    "optimizer",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "weight_decay",
    "max_grad_norm",
    "lr_scheduler",
    "lr_warmup_steps",
    "snr_gamma",
    "noise_offset",
    "random_flip",
    "masks",
    "mask_model",
    "mask_background_weight",
    "buckets",
    "ema_decay",
    "train_text_encoder",
    "text_encoder_parts",
    "text_encoder_method",
    "text_encoder_options",
    "text_encoder_layers",
    "text_encoder_lr",
    "token_vectors",
    "token_init",
    "token_lr",
    "token_steps",
)
# Settings of earlier versions, upgraded where a config is read: {old name: (new name, {old value: new value})}.
RENAMED = {"prior_preservation": ("prior", {True: "images", False: "none"})}


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a TOML/JSON file and keyword overrides (overrides win; method options merge)."""
    values: dict[str, Any] = read_config_file(path) if path else {}
    values, overrides = upgrade_legacy(values), upgrade_legacy(overrides)  # each source renamed, then overrides win
    merged = {name: {**values.pop(name, {}), **overrides.pop(name, {})} for name in ("method_options", "text_encoder_options")}
    values.update({k: v for k, v in overrides.items()})
    values.update(merged)
    return make_config(values, source=str(path) if path else "arguments")


def read_config_file(path: str | Path) -> dict[str, Any]:
    import json
    import tomllib

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from exc
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise UserError(f"config file '{path}' is not valid {kind}: {exc}") from exc
    if not isinstance(values, dict):
        raise UserError(f"config file '{path}' must hold a table of TrainConfig fields")
    return {key.replace("-", "_"): value for key, value in values.items()}


def upgrade_legacy(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with settings of earlier versions renamed (e.g. prior_preservation = false -> prior = 'none')."""
    values = dict(values)
    for old, (new, mapping) in RENAMED.items():
        if old not in values:
            continue
        value = values.pop(old)
        matches = [v for k, v in mapping.items() if type(k) is type(value) and k == value]
        if not matches:
            accepted = " or ".join(repr(k).lower() for k in mapping)
            raise UserError(f"setting '{old}' (now '{new}') must be {accepted}, got {value!r}")
        values.setdefault(new, matches[0])
    return values


def make_config(values: dict[str, Any], source: str = "arguments") -> TrainConfig:
    """Check names and types of `values`, then build the config."""
    values = upgrade_legacy(values)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown training setting(s) {', '.join(unknown)} in {source}; accepted: {', '.join(FIELDS)}")
    missing = [name for name in ("instance_images", "output_dir") if values.get(name) in (None, "", [])]
    if missing:
        raise UserError(f"missing required setting(s): {', '.join(missing)} (the subject's images and an output folder)")
    hints = typing.get_type_hints(TrainConfig)
    for name, value in values.items():
        values[name] = _check_type(name, value, hints[name], source)
    return TrainConfig(**values)


def _check_type(name: str, value: Any, hint: Any, source: str) -> Any:
    """`value` converted to the field's type (int -> float where a float is expected), or a UserError."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        if origin is dict and isinstance(value, dict):
            return dict(value)
    accepted = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "none") for o in options)
    raise UserError(f"setting '{name}' in {source} must be {accepted}, got {value!r}")


def resolve(config: TrainConfig) -> TrainConfig:
    """A copy with the method's paper defaults filled in and every value checked."""
    from ..models import sample_steps_for

    method = get_method(config.method)
    adapter_config = method.make_config(dict(config.method_options))  # raises on unknown options
    steps = method.train_defaults.steps if config.steps is None else config.steps
    default_lr = PRODIGY_LR if config.optimizer == "prodigy" else method.train_defaults.lr
    lr = default_lr if config.lr is None else config.lr
    sample_steps = sample_steps_for(config.base_model) if config.sample_steps is None else config.sample_steps
    resolved = dataclasses.replace(config, steps=steps, lr=lr, sample_steps=sample_steps, method_options=adapter_config.to_dict())
    _check_values(resolved)
    return resolved


def _check_values(c: TrainConfig) -> None:
    from ..data import check_resolution
    from ..parts import TEXT_LAYERS, check_text_method

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    for name in FIELDS:  # inf and nan pass every range check below and are not valid JSON in config.json
        value = getattr(c, name)
        need(not isinstance(value, float) or math.isfinite(value), f"{name} must be a finite number, got {value}")
    need(c.steps >= 1, f"steps must be a positive integer, got {c.steps}")
    need(math.isfinite(c.lr) and c.lr > 0, f"lr must be a positive number, got {c.lr}")
    check_resolution(c.resolution)
    for name in (
        "batch_size",
        "gradient_accumulation_steps",
        "class_batch_size",
        "sample_steps",
        "checkpoints_keep",
        "eval_timesteps",
        "eval_images",
        "eval_batch_size",
    ):
        need(getattr(c, name) >= 1, f"{name} must be a positive integer, got {getattr(c, name)}")
    for name in ("validation_every", "checkpoint_every", "lr_warmup_steps"):
        need(getattr(c, name) >= 0, f"{name} must be 0 or a positive integer, got {getattr(c, name)}")
    need(c.prior != "images" or c.class_images >= 1, f"class_images must be at least 1 with prior 'images', got {c.class_images}")
    for name in ("prior_loss_weight", "weight_decay", "max_grad_norm", "noise_offset", "validation_guidance", "adam_epsilon"):
        value = getattr(c, name)
        need(math.isfinite(value) and value >= 0, f"{name} must be a non-negative number, got {value}")
    need(
        math.isfinite(c.mask_background_weight) and 0 <= c.mask_background_weight <= 1,
        f"mask_background_weight must lie in [0, 1], got {c.mask_background_weight}",
    )
    need(0 <= c.ema_decay < 1, f"ema_decay must lie in [0, 1) (0 = off; 0.999 is typical), got {c.ema_decay}")
    need(0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1, f"adam betas must lie in [0, 1), got {c.adam_beta1}, {c.adam_beta2}")
    check_seed(c.seed)
    need(
        math.isfinite(c.keep_unconditional) and c.keep_unconditional >= 0,
        f"keep_unconditional must be a number >= 0 (0 = off), got {c.keep_unconditional}",
    )
    need(c.snr_gamma is None or c.snr_gamma > 0, f"snr_gamma must be a positive number (or unset), got {c.snr_gamma}")
    for name, accepted in (
        ("mixed_precision", MIXED_PRECISION),
        ("optimizer", OPTIMIZERS),
        ("lr_scheduler", SCHEDULES),
        ("report_to", REPORT_TO),
        ("prior", PRIORS),
        ("masks", MASKS),
    ):
        need(getattr(c, name) in accepted, f"{name} '{getattr(c, name)}' is not supported; accepted: {', '.join(accepted)}")
    need(bool(c.token.strip()), "token must not be empty (DreamBooth binds the subject to it, e.g. 'sks')")
    need(bool(c.class_noun.strip()), "class_noun must not be empty (e.g. dog, backpack, person)")
    need(not (c.resume and c.overwrite), "choose either resume (continue the run in output_dir) or overwrite (replace it), not both")
    for name in ("instance_prompt", "class_prompt"):
        check_template(name, getattr(c, name))
    need("{token}" in c.instance_prompt, f"instance_prompt must contain {{token}}, got '{c.instance_prompt}'")
    for template in c.validation_prompts:
        check_template("validation_prompts", template)
    tracked(c)  # raises on unknown metric names
    need(0 <= c.token_vectors <= 4, f"token_vectors must be 0 (off) to 4, got {c.token_vectors}")
    need(c.token_steps >= 0, f"token_steps must be 0 (all steps) or a positive integer, got {c.token_steps}")
    need(math.isfinite(c.token_lr) and c.token_lr > 0, f"token_lr must be a positive number, got {c.token_lr}")
    need(
        c.text_encoder_lr is None or (math.isfinite(c.text_encoder_lr) and c.text_encoder_lr > 0),
        f"text_encoder_lr must be a positive number (or unset), got {c.text_encoder_lr}",
    )
    layers = c.text_encoder_layers
    need(layers in TEXT_LAYERS, f"text_encoder_layers '{layers}' is not supported; accepted: {', '.join(TEXT_LAYERS)}")
    need(
        c.train_text_encoder or not c.text_encoder_options,
        f"text_encoder_options ({', '.join(c.text_encoder_options)}) apply only with train_text_encoder "
        "(--train-text-encoder); set it or drop the options",
    )
    if c.train_text_encoder:
        text_method = get_method(c.text_encoder_method or c.method)
        check_text_method(text_method)
        text_method.make_config({k: v for k, v in c.text_encoder_options.items()})  # raises on unknown options
    for name, accepted in (("track_embedders", EMBEDDER_SETS), ("select_by", SELECTION_RULES)):
        need(getattr(c, name) in accepted, f"{name} '{getattr(c, name)}' is not supported; accepted: {', '.join(accepted)}")
    need(math.isfinite(c.drift_limit) and c.drift_limit >= 0, f"drift_limit must be a non-negative number, got {c.drift_limit}")


def tracked(c: TrainConfig) -> list[str]:
    """The metrics to score at each validation ([] when tracking is off or there is no validation)."""
    names = [] if c.track_metrics.strip().lower() == "none" else [n.strip() for n in c.track_metrics.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKABLE]
    if unknown:
        raise UserError(f"track_metrics: unknown metric(s) {', '.join(unknown)}; accepted: {', '.join(TRACKABLE)} or 'none'")
    if not (c.validation_every and c.validation_prompts):
        return []
    return list(dict.fromkeys(names))
