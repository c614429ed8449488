"""The text-encoder training step of `personalize bench --text-encoder`.

Measured per method, besides its UNet-only step: a fixed prompt's token ids (tokenized once, padded
to 77 as the pipelines do, one row per image of the batch) -> the base model's text encoder(s), each
with the method's adapter on its attention projections (`parts.DEFAULT_TEXT_LAYERS`, the trainer's
default; the method's options minus the UNet's layer choice, as the trainer's `text_encoder_options`)
-> the UNet with its adapter -> MSE to fixed noise -> backward through both -> an AdamW step of both
adapters' tensors.

Conditioning as the pipelines' `encode_prompt` computes it (no clip skip): SD 1.x / 2.x take the text
encoder's last hidden states; SDXL concatenates both encoders' penultimate hidden states and takes
the pooled projection of the second (the size/crop time ids stay the fixed ones of `unet_inputs`).
The text encoders stay frozen, in eval mode and without gradient checkpointing, as the trainer keeps them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import get_method
from ..errors import UserError
from ..inject import Adapter
from ..parts import DEFAULT_TEXT_LAYERS, TOKENIZERS, attach_text_encoder, check_text_method, text_parts
from ..training.conditioning import is_sdxl

PROMPT = "a photo of sks dog"  # DreamBooth's instance prompt; its content does not change the cost
UNET_LAYER_OPTIONS = ("preset", "targets")  # a method's own layer choice names UNet layers (training/text_side.py)


def has_text_target(method: str) -> bool:
    """Whether `method` adapts Linear layers, the only kind a CLIP text encoder has (filter_atoms does not)."""
    try:
        check_text_method(get_method(method))
    except UserError:
        return False
    return True


class TextEncoders:
    """The text encoder(s) of a loaded pipeline and the fixed prompt's token ids for each."""

    def __init__(self, pipe: Any, base_model: str, batch: int, device: torch.device) -> None:
        parts = text_parts(pipe)
        if not parts:
            raise UserError(f"base model '{base_model}' has no text encoder; accepted with --text-encoder: a full SD / SDXL pipeline")
        self.parts = parts
        self.encoders: list[nn.Module] = [getattr(pipe, part) for part in parts]
        self.ids = [_token_ids(getattr(pipe, TOKENIZERS[part]), batch).to(device) for part in parts]
        self.sdxl = is_sdxl(pipe)
        for encoder in self.encoders:
            encoder.requires_grad_(False)

    def sizes(self) -> dict[str, int]:
        """Parameters of each text encoder, by part name."""
        return {part: sum(p.numel() for p in encoder.parameters()) for part, encoder in zip(self.parts, self.encoders)}

    def attachers(self, method: str, options: dict[str, Any]) -> list[Callable[[], Adapter]]:
        """One function per text encoder that attaches `method` to it (same options as the UNet's)."""
        text_options = {k: v for k, v in options.items() if k not in UNET_LAYER_OPTIONS}
        return [partial(attach_text_encoder, encoder, method, layers=DEFAULT_TEXT_LAYERS, **text_options) for encoder in self.encoders]

    def condition(self, inputs: dict) -> dict:
        """`inputs` of the UNet with the text conditioning computed now, through the adapted encoder(s)."""
        if not self.sdxl:
            return {**inputs, "encoder_hidden_states": self.encoders[0](self.ids[0])[0]}
        outputs = [encoder(ids, output_hidden_states=True) for encoder, ids in zip(self.encoders, self.ids)]
        states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        added = {**inputs["added_cond_kwargs"], "text_embeds": outputs[-1][0]}  # the second encoder's pooled projection
        return {**inputs, "encoder_hidden_states": states, "added_cond_kwargs": added}


def _token_ids(tokenizer: Any, batch: int) -> torch.Tensor:
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return ids.repeat(batch, 1)
