"""Training the text side: text-encoder adapters and a learned token (pivotal tuning) with the UNet."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personalize.errors import UserError
from personalize.io import adapter_info
from personalize.models import load_pipeline
from personalize.pipeline_adapter import load_adapter
from personalize.train import TrainConfig, train
from personalize.training.text_side import chosen_parts
from tests.test_training.test_train_options import save_tiny_pipeline
from tests.test_training.test_train_resume import assert_same_run, resumed_run

TEXT_SIDE = dict(train_text_encoder=True, token_vectors=2, token_lr=1e-2, steps=4)


def text_output(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt=[prompt], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]


def test_text_encoder_and_token_train_and_load(fast):
    result = train(TrainConfig(**{**fast, **TEXT_SIDE}))
    info = adapter_info(result.adapter_path)
    assert set(info["parts"]) == {"unet", "text_encoder"} and info["tokens"] == {"text_encoder": {"sks": 2}}
    assert result.num_trainable == sum(p["num_trainable"] for p in info["parts"].values()) + 2 * 32  # 2 vectors of width 32
    assert result.eval_loss_end < result.eval_loss_start

    pipe = load_pipeline("tiny")
    base = text_output(pipe, "a photo of sks person")
    adapter = load_adapter(pipe, result.adapter_path)
    trained = text_output(pipe, "a photo of sks person")
    assert not torch.allclose(trained, base)  # the adapted text encoder and the learned token change the conditioning
    adapter.detach()
    assert torch.equal(text_output(pipe, "a photo of sks person"), base)


def test_resume_with_text_side_reproduces_the_uninterrupted_run(fast, tmp_path):
    settings = {**fast, **TEXT_SIDE, "steps": 5, "checkpoint_every": 2, "token_steps": 3}
    full = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "full")}))
    resumed = resumed_run(settings, tmp_path / "part")
    assert_same_run(full, resumed)
    # the token trained for 3 steps only: its vectors at the end are those of the step-4 checkpoint
    final = load_file(full.adapter_path)
    at_four = load_file(Path(full.output_dir) / "checkpoints" / "step_000004" / "adapter.safetensors")
    token_keys = [k for k in final if "__token__" in k]
    assert token_keys and all(torch.equal(final[k], at_four[k]) for k in token_keys)


def test_sdxl_trains_one_chosen_text_encoder(fast, tmp_path):
    base = save_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    settings = {**fast, "base_model": base, "train_text_encoder": True, "text_encoder_parts": "text_encoder_2", "steps": 2}
    result = train(TrainConfig(**settings))
    assert set(adapter_info(result.adapter_path)["parts"]) == {"unet", "text_encoder_2"}


def test_text_side_refusals(fast, caplog):
    with pytest.raises(UserError, match="filter_atoms"):
        train(TrainConfig(**{**fast, "train_text_encoder": True, "method": "filter_atoms"}))
    with pytest.raises(UserError, match="token_vectors must be 0"):
        train(TrainConfig(**{**fast, "token_vectors": 5}))

    class BareUNet:
        unet = torch.nn.Linear(1, 1)

    with pytest.raises(UserError, match="no text encoder"):
        chosen_parts(BareUNet(), "all")
    with caplog.at_level(logging.INFO, logger="personalize.training.text_side"):
        train(TrainConfig(**{**fast, "token": "dog", "steps": 1}))
        train(TrainConfig(**{**fast, "token": "zwx", "steps": 1, "overwrite": True}))
    assert "token 'dog' is a common word" in caplog.text and "token 'zwx' is split by the tokenizer" in caplog.text
