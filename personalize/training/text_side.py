"""The text side of a run: adapters on the text encoder(s) and a learned subject token (pivotal tuning).

Settings (TrainConfig): `train_text_encoder` with `text_encoder_parts` (SDXL: one or both encoders),
`text_encoder_method` / `text_encoder_options` / `text_encoder_layers` / `text_encoder_lr`; and
`token_vectors` (pivotal tuning, 0 = off) with `token_init`, `token_lr`, `token_steps`.

The run's adapter is then a `PipelineAdapter`: the UNet's adapter, one adapter per chosen text
encoder and the token's (token_vectors, width) embedding per text encoder, trained in one optimiser
(groups `unet:*`, `text_encoder:*`, `tokens`) and saved in one file. Without either setting the run
keeps the UNet-only `Adapter` (and its file layout) of earlier versions.

While a text-side tensor trains, the prompts' conditioning changes every step, so it is recomputed
for each micro-batch with gradients (`conditioning.encode_with_grad`); once the token stops training (`token_steps`)
and no text-encoder adapter trains, the trainer caches it again.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import UserError
from ..inject import Adapter, attach
from ..parts import attach_text_encoders, text_parts
from ..pipeline_adapter import TOKEN_GROUP, PipelineAdapter
from ..pipeline_adapter import load_adapter as load_pipeline_adapter
from ..tokens import new_tokens

log = logging.getLogger(__name__)

# DreamBooth (Ruiz et al. 2023, §4.1) picks its identifier among the rarest tokens of the vocabulary; CLIP's BPE
# ids grow with rarity, so a one-piece token among the first ids is a word the model knows well.
COMMON_WORD_IDS = 5000


def trains_text(config) -> bool:
    return config.train_text_encoder or config.token_vectors > 0


def chosen_parts(pipe: Any, requested: str) -> list[str]:
    """The text encoders to adapt: 'all' = every one the pipeline has, else a comma-separated list of part names."""
    have = text_parts(pipe)
    if not have:
        raise UserError("this base model has no text encoder (a bare UNet): train_text_encoder and token_vectors need one")
    if requested == "all":
        return have
    parts = [p.strip() for p in requested.split(",") if p.strip()]
    unknown = [p for p in parts if p not in have]
    if unknown or not parts:
        raise UserError(f"text_encoder_parts '{requested}' names {', '.join(unknown) or 'nothing'}; this model has: all, {', '.join(have)}")
    return parts


def build_adapter(pipe: Any, config) -> Adapter | PipelineAdapter:
    """The run's fresh adapter: the UNet's alone, or with the text side (module docstring)."""
    unet_adapter = attach(pipe.unet, config.method, **config.method_options)
    if not trains_text(config):
        return unet_adapter
    try:
        parts: dict[str, Adapter] = {}
        if config.train_text_encoder:
            parts = attach_text_encoders(
                pipe,
                config.text_encoder_method or config.method,
                parts=chosen_parts(pipe, config.text_encoder_parts),
                layers=config.text_encoder_layers,
                **text_encoder_options(config),
            )
        tokens = None
        if config.token_vectors:
            word = config.token_init or config.class_noun
            tokens = new_tokens(pipe, {config.token: word}, config.token_vectors, chosen_parts(pipe, "all"))
            log.info("pivotal tuning: token '%s', %d vector(s) per text encoder, from '%s'", config.token, config.token_vectors, word)
        return PipelineAdapter(pipe, {"unet": unet_adapter, **parts}, tokens)
    except BaseException:
        unet_adapter.detach()
        raise


def text_encoder_options(config) -> dict:
    """The text-encoder method's options: its own, over the UNet's when it is the same method (minus the
    UNet's layer choice: `preset`, `targets`)."""
    if config.text_encoder_method and config.text_encoder_method != config.method:
        return dict(config.text_encoder_options)
    inherited = {k: v for k, v in config.method_options.items() if k not in ("preset", "targets")}
    return {**inherited, **config.text_encoder_options}


def load_for_training(pipe: Any, config, path) -> Adapter | PipelineAdapter:
    """A checkpoint's adapter, attached as `build_adapter` would have built it."""
    if trains_text(config):
        return load_pipeline_adapter(pipe, path)
    from ..inject import load_adapter

    return load_adapter(pipe.unet, path)


def learning_rates(config) -> dict[str, float]:
    """Per-part learning rates of a PipelineAdapter's groups (text encoders default to the UNet's lr)."""
    rates: dict[str, float] = {TOKEN_GROUP: config.token_lr}
    if config.text_encoder_lr is not None:
        rates.update({part: config.text_encoder_lr for part in ("text_encoder", "text_encoder_2")})
    return rates


def prodigy_note(config) -> str | None:
    """With optimizer 'prodigy' every rate is a multiplier of Prodigy's one step-size estimate, as lr is: a
    warning when a text-side rate is far below lr (an AdamW-sized value such as 5e-4 all but freezes that part)."""
    if config.optimizer != "prodigy":
        return None
    given = {"token_lr": config.token_lr if config.token_vectors else None}
    given["text_encoder_lr"] = config.text_encoder_lr if config.train_text_encoder else None
    low = [f"{name} {value:g}" for name, value in given.items() if value is not None and value < 0.1 * config.lr]
    if not low:
        return None
    return (
        f"optimizer prodigy: {', '.join(low)} is a multiplier of Prodigy's step size, as lr ({config.lr:g}) is, so that part "
        "trains at a small fraction of the UNet's step; set it near lr (e.g. 1.0) to train it alike"
    )


def parameter_groups(adapter: Adapter | PipelineAdapter, config) -> list[dict[str, Any]]:
    if isinstance(adapter, PipelineAdapter):
        rates = {k: v for k, v in learning_rates(config).items() if k in adapter.parts or k == TOKEN_GROUP}
        return adapter.parameter_groups(config.lr, rates)
    return adapter.parameter_groups(config.lr)


def unet_adapter(adapter: Adapter | PipelineAdapter) -> Adapter:
    return adapter.parts["unet"] if isinstance(adapter, PipelineAdapter) else adapter


def main_group(groups: list[dict[str, Any]], adapter: Adapter | PipelineAdapter) -> int:
    """The index of the group trained at `lr` itself (ratio 1 of the UNet method; e.g. FRoD's on-axis
    group): the one progress reports."""
    ratios = unet_adapter(adapter).method.group_lr_ratio
    prefix = "unet:" if isinstance(adapter, PipelineAdapter) else ""
    return next((i for i, g in enumerate(groups) if ratios.get(g["name"].removeprefix(prefix)) == 1.0), 0)


def text_trains_now(adapter: Adapter | PipelineAdapter) -> bool:
    """Whether a text-side tensor still trains (then conditioning must be recomputed each step)."""
    if not isinstance(adapter, PipelineAdapter):
        return False
    if any(part != "unet" for part in adapter.parts):
        return True
    return adapter.tokens is not None and any(p.requires_grad for p in adapter.tokens.parameters())


def freeze_token(adapter: Adapter | PipelineAdapter) -> None:
    """Stop training the token's vectors (after token_steps); the optimiser skips tensors without gradients."""
    if isinstance(adapter, PipelineAdapter) and adapter.tokens is not None:
        for param in adapter.tokens.parameters():
            param.requires_grad_(False)
            param.grad = None


def token_notes(tokenizer: Any, token: str) -> None:
    """Log how the tokenizer reads the subject token: several pieces (allowed, said in the log) or a
    common word (a warning naming it)."""
    if tokenizer is None:
        return
    pieces = tokenizer.tokenize(token)
    if len(pieces) > 1:
        log.info("token '%s' is split by the tokenizer into pieces (%s); allowed: the subject binds to them all", token, " ".join(pieces))
        return
    ids = tokenizer.convert_tokens_to_ids(pieces)
    if ids and ids[0] is not None and ids[0] < COMMON_WORD_IDS:
        log.warning(
            "token '%s' is a common word for the text encoder (vocabulary id %d): the subject will mix with what the model "
            "knows of it; a rare token such as 'sks' (DreamBooth) binds more cleanly",
            token,
            ids[0],
        )
