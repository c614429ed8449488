"""Text conditioning for the UNet, computed once with the frozen text encoder(s) and cached (or, while
the text side trains, recomputed each step with gradients: `encode_with_grad`).

SD 1.x / 2.x condition on the text encoder's hidden states; SDXL also on the pooled embedding of
its second encoder and on six size/crop "time ids" (per training image: its original size and crop). Both come from the pipeline's own
`encode_prompt`, so whatever the pipeline does at inference (clip skip, zeroed empty prompts)
is what training sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Per-prompt UNet conditioning; row i belongs to prompt i."""

    embeds: torch.Tensor  # (n, seq, dim)
    pooled: torch.Tensor | None = None  # (n, pooled_dim), SDXL only
    time_ids: torch.Tensor | None = None  # (n, 6), SDXL only

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def take(self, index: torch.Tensor) -> Conditioning:
        pick = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        return Conditioning(self.embeds[index.to(self.embeds.device)], pick(self.pooled), pick(self.time_ids))

    def cat(self, other: Conditioning) -> Conditioning:
        join = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return Conditioning(torch.cat([self.embeds, other.embeds]), join(self.pooled, other.pooled), join(self.time_ids, other.time_ids))

    def with_time_ids(self, time_ids: torch.Tensor) -> Conditioning:
        """This conditioning with SDXL's (n, 6) size/crop ids replaced (unchanged for SD 1.x/2.x, which have none)."""
        if self.time_ids is None:
            return self
        return Conditioning(self.embeds, self.pooled, time_ids.to(self.time_ids.device, self.time_ids.dtype))

    def unet_kwargs(self) -> dict:
        kwargs: dict = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def pipeline_kwargs(self, negative: Conditioning) -> dict:
        """Keyword arguments of a diffusers pipeline call with precomputed prompt embeddings."""
        kwargs = {"prompt_embeds": self.embeds, "negative_prompt_embeds": negative.embeds}
        if self.pooled is not None:
            kwargs.update(pooled_prompt_embeds=self.pooled, negative_pooled_prompt_embeds=negative.pooled)
        return kwargs


def is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device: torch.device, resolution: int) -> tuple[Conditioning, Conditioning]:
    """(conditioning of `prompts`, conditioning of the empty negative prompt), one row per prompt."""
    out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    if not is_sdxl(pipe):
        positive, negative = out
        return Conditioning(positive), Conditioning(negative)
    positive, negative, pooled, negative_pooled = out
    time_ids = inference_time_ids(len(prompts), resolution, positive)
    return Conditioning(positive, pooled, time_ids), Conditioning(negative, negative_pooled, time_ids.clone())


def encode_with_grad(pipe, prompts: list[str], device: torch.device, resolution: int) -> Conditioning:
    """The conditioning of `prompts` through the text encoder(s) as they are now, with gradients
    (while the text side trains); no negative prompt."""
    out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    if not is_sdxl(pipe):
        return Conditioning(out[0])
    return Conditioning(out[0], out[2], inference_time_ids(len(prompts), resolution, out[0]))


def inference_time_ids(count: int, resolution: int, like: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning (original size, crop top-left, target size): (res, res, 0, 0, res, res) is
    what inference uses; training replaces it per image with the photo's own size and crop
    (`Conditioning.with_time_ids`), as diffusers' and kohya's SDXL trainers do. (count, 6)"""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * count, device=like.device, dtype=like.dtype)
