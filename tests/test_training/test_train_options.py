"""Training options: mixed precision, gradient checkpointing, accumulation with schedules, TensorBoard,
the objective (v-prediction, Min-SNR, noise offset) and SD 2.x / SDXL pipelines built from tiny parts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personalize.generate import AdapterSpec, generate
from personalize.models import SD15_SCHEDULER, _random_text_encoder, _random_vae, clip_tokenizer, load_pipeline, tiny_unet
from personalize.train import TrainConfig, train
from personalize.training.objective import EvalSet, min_snr_weights, snr, target_for


def log_records(folder) -> list[dict]:
    return [r for r in map(json.loads, (Path(folder) / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_bf16_keeps_trainable_tensors_in_float32(fast):
    result = train(TrainConfig(**{**fast, "method": "loldu", "steps": 2, "mixed_precision": "bf16"}))
    out = Path(result.output_dir)
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "bf16"
    tensors = load_file(out / "adapter.safetensors")
    assert {t.dtype for name, t in tensors.items() if not name.endswith(".perm")} == {torch.float32}
    assert math.isfinite(result.eval_loss_end) and all(math.isfinite(r["loss"]) for r in log_records(out))


def test_gradient_checkpointing_gives_the_same_training(fast, tmp_path):
    runs = {}
    for flag in (False, True):
        settings = {**fast, "method": "svfit", "steps": 2, "gradient_checkpointing": flag, "output_dir": str(tmp_path / str(flag))}
        runs[flag] = train(TrainConfig(**settings))
    plain, checkpointed = (log_records(runs[f].output_dir) for f in (False, True))
    assert [r["loss"] for r in checkpointed] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    a, b = (load_file(runs[f].adapter_path) for f in (False, True))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a) and any(a[k].abs().sum() > 0 for k in a)


def test_accumulation_steps_the_schedule_once_per_optimiser_step(fast):
    result = train(
        TrainConfig(
            **{
                **fast,
                "method": "svfit",
                "steps": 2,
                "gradient_accumulation_steps": 2,
                "batch_size": 2,
                "lr_scheduler": "cosine",
                "random_flip": True,
            }
        )
    )
    records = log_records(result.output_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert [r["lr"] for r in records] == pytest.approx([0.5e-2, 0.0], abs=1e-12)  # cosine over 2 optimiser steps


def test_tensorboard(fast):
    result = train(TrainConfig(**{**fast, "method": "svfit", "steps": 2, "report_to": "tensorboard"}))
    events = list((Path(result.output_dir) / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_velocity_target_and_min_snr_weights():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(target_for(scheduler, x0, noise, t), alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0)
    ratio = snr(scheduler, t)
    torch.testing.assert_close(ratio, alpha_bar.flatten() / (1 - alpha_bar.flatten()))
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0), torch.minimum(ratio, torch.tensor(5.0)) / (ratio + 1))
    scheduler.register_to_config(prediction_type="epsilon")
    assert target_for(scheduler, x0, noise, t) is noise
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0), torch.minimum(ratio, torch.tensor(5.0)) / ratio)


def test_eval_set_is_fixed():
    from diffusers import DDPMScheduler

    from personalize.training.conditioning import Conditioning

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(2, 4, 8, 8)
    cond = Conditioning(torch.randn(2, 7, 32))
    a, b = EvalSet.build(scheduler, latents, cond, 4), EvalSet.build(scheduler, latents, cond, 4)
    assert a.timesteps.tolist() == [125, 375, 625, 875] * 2
    assert torch.equal(a.noise, b.noise) and torch.equal(a.latents[4], latents[1])


def save_tiny_pipeline(folder: Path, style: str) -> str:
    """A complete SD 2.x (v-prediction) or SDXL pipeline from tiny random parts, saved as a diffusers folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    schedule = {k: v for k, v in SD15_SCHEDULER.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    if style == "sd2":
        pipe = StableDiffusionPipeline(
            vae=_random_vae(2),
            text_encoder=_random_text_encoder(48, 2, 4),
            tokenizer=clip_tokenizer(),
            unet=tiny_unet("sd2"),
            scheduler=EulerDiscreteScheduler(**schedule, prediction_type="v_prediction"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
        torch.manual_seed(0)
        pipe = StableDiffusionXLPipeline(
            vae=_random_vae(2),
            text_encoder=_random_text_encoder(32, 2, 4),
            text_encoder_2=CLIPTextModelWithProjection(config),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            unet=tiny_unet("sdxl"),
            scheduler=EulerDiscreteScheduler(**schedule),
        )
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("style", ["sd2", "sdxl"])
def test_other_model_families(style, fast, tmp_path):
    base = save_tiny_pipeline(tmp_path / style, style)
    settings = {
        **fast,
        "base_model": base,
        "method": "svfit",
        "steps": 3,
        "snr_gamma": 5.0,
        "noise_offset": 0.05,
        "validation_every": 3,
        "validation_prompts": ["a {token} {class_noun}"],
    }
    result = train(TrainConfig(**settings))
    assert result.steps_done == 3 and math.isfinite(result.eval_loss_end) and result.eval_loss_end != result.eval_loss_start
    assert Path(result.samples[0]).is_file()
    assert all(math.isfinite(r["loss"]) for r in log_records(result.output_dir))
    pipe = load_pipeline(base, device="cpu")
    images = generate(pipe, "a {token} {class_noun}", adapters=[AdapterSpec(result.adapter_path)], steps=2)
    assert images[0].image.size == (64, 64) and images[0].prompt == "a sks person"
