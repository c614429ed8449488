"""One adapter over several parts of a pipeline: per-part adapters (UNet, text encoders) and learned
tokens, one handle and one file.

    unet = attach(pipe.unet, "svfit")
    text = attach_text_encoders(pipe, "lora", rank=4)              # {"text_encoder": Adapter, ...}
    tokens = new_tokens(pipe, {"<sks>": "dog"}, num_vectors=2)     # pivotal tuning
    adapter = PipelineAdapter(pipe, {"unet": unet, **text}, tokens)
    optimiser = AdamW(adapter.parameter_groups(lr=1e-4, lrs={"tokens": 5e-4}))
    adapter.save("concept.safetensors")
    adapter = load_adapter(pipe, "concept.safetensors")            # every part in the file, tokens inserted

Each `Adapter` operation applies part by part. Tokens are words a prompt uses or not: they have no
strength, are not merged and stay in while the parts are switched off; `detach` removes them.
`load_adapter` with a single model (a bare UNet) is `inject.load_adapter`, for UNet-only files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .inject import Adapter, Trainables, adapter_part, base_model_id, check_scale, load_part
from .inject import load_adapter as load_model_adapter
from .io import PARTS, TOKEN_KEY, AdapterFile, read_adapter_file, write_adapter_file
from .parts import is_pipeline, part_model
from .tokens import Tokens, insert_tokens

TOKEN_GROUP = "tokens"  # the parameter group of token vectors
# Learning rate of token vectors when none is given: diffusers' textual inversion example
# (examples/textual_inversion/README.md, --learning_rate=5.0e-04).
TOKEN_LR = 5e-4


class PipelineAdapter(Trainables):
    """Adapters on parts of `pipe` (`{part: Adapter}`, part names as in `io.PARTS`) and its inserted tokens."""

    def __init__(self, pipe: Any, parts: Mapping[str, Adapter], tokens: Tokens | None = None) -> None:
        for part, adapter in parts.items():
            if adapter.root is not part_model(pipe, part):
                raise UserError(f"the adapter given for {part} is attached to another model than this pipeline's {part}")
        self.pipe = pipe
        self.parts = {part: parts[part] for part in PARTS if part in parts}
        self.tokens = tokens
        self.metadata: dict[str, Any] = {}  # extra metadata saved with the file (base model, training config)
        for param in self.parameters():  # attaching a part freezes its model, token vectors included
            param.requires_grad_(True)

    # --- inspection -------------------------------------------------------------------------
    def named_trainables(self) -> Iterator[tuple[str, nn.Parameter, str]]:
        """(name, parameter, group): names as the file's keys (`<part>.<layer>.<tensor>`,
        `<part>.__token__.<token>`), groups `<part>:<method group>` and "tokens"."""
        for part, adapter in self.parts.items():
            for name, param, group in adapter.named_trainables():
                yield f"{part}.{name}", param, f"{part}:{group}"
        if self.tokens is not None:
            for part, token, param in self.tokens.named_parameters():
                yield f"{part}.{TOKEN_KEY}.{token}", param, TOKEN_GROUP

    def expected_num_trainable(self) -> int:
        """Each part's documented formula, plus n_vectors * width per token and text encoder."""
        tokens = self.tokens.num_trainable if self.tokens is not None else 0
        return sum(adapter.expected_num_trainable() for adapter in self.parts.values()) + tokens

    def parameter_groups(self, lr: float | None = None, lrs: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """Optimiser groups `<part>:<group>` and "tokens". A part's main learning rate is `lrs[part]`,
        else `lr`, else its method's default, and its other groups keep the method's ratio; tokens
        train at `lrs["tokens"]`, else `lr`, else TOKEN_LR."""
        lrs = dict(lrs or {})
        unknown = sorted(set(lrs) - set(self.parts) - {TOKEN_GROUP})
        if unknown:
            raise UserError(
                f"learning rate given for '{unknown[0]}', which this adapter lacks; accepted: {', '.join([*self.parts, TOKEN_GROUP])}"
            )
        groups = []
        for part, adapter in self.parts.items():
            for group in adapter.parameter_groups(lrs.get(part, lr)):
                groups.append({**group, "name": f"{part}:{group['name']}"})
        if self.tokens is not None and self.tokens.parameters():
            groups.append(
                {"name": TOKEN_GROUP, "params": self.tokens.parameters(), "lr": lrs.get(TOKEN_GROUP, TOKEN_LR if lr is None else lr)}
            )
        return groups

    # --- strength, merge ----------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The parts' common strength (1 for tokens alone); parts given different strengths are a UserError."""
        scales = {adapter.scale for adapter in self.parts.values()} or {1.0}
        if len(scales) > 1:
            raise UserError(
                f"the parts have different scales ({', '.join(f'{p}: {a.scale:g}' for p, a in self.parts.items())}); read each part's"
            )
        return scales.pop()

    @scale.setter
    def scale(self, value: float) -> None:
        value = check_scale(value)
        for adapter in self.parts.values():
            adapter.scale = value

    @property
    def merged(self) -> bool:
        return any(adapter.merged for adapter in self.parts.values())

    @torch.no_grad()
    def deltas(self) -> dict[str, dict[str, torch.Tensor]]:
        """part -> layer -> scale * delta (float32, shaped like the layer's weight)."""
        return {part: adapter.deltas() for part, adapter in self.parts.items()}

    @contextmanager
    def switched_off(self) -> Iterator[None]:
        """Inside, every part runs its base model exactly (tokens stay inserted)."""
        with ExitStack() as stack:
            for adapter in self.parts.values():
                stack.enter_context(adapter.switched_off())
            yield

    def merge(self) -> None:
        """Fold every part's `scale * delta` into its weights; all parts or none."""
        try:
            for adapter in self.parts.values():
                adapter.merge()
        except BaseException:
            self.unmerge()
            raise

    def unmerge(self) -> None:
        for adapter in self.parts.values():
            adapter.unmerge()

    def detach(self) -> None:
        """Remove every part and the tokens: the pipeline is the base pipeline again, bit-exactly."""
        for adapter in self.parts.values():
            adapter.detach()
        if self.tokens is not None:
            self.tokens.remove()

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write every part and token into one file, atomically (layout: `io`)."""
        extra = {**self.metadata, **(metadata or {})}
        return write_adapter_file(
            AdapterFile(
                path=Path(path),
                parts={part: adapter_part(adapter) for part, adapter in self.parts.items()},
                tokens=self.tokens.vectors() if self.tokens is not None else {},
                base_model=str(extra.pop("base_model", None) or base_model_id(self.pipe.unet)),
                num_trainable=self.num_trainable,
                metadata=extra,
            )
        )


def load_adapter(model: Any, path: str | Path) -> Adapter | PipelineAdapter:
    """Attach the adapter file at `path`. Given a pipeline: a `PipelineAdapter` with every part the file
    holds and its tokens inserted, all or nothing. Given a single model (a bare UNet): its `Adapter`,
    for files holding only a UNet part (others are a UserError that says to pass the pipeline)."""
    if not is_pipeline(model):
        return load_model_adapter(model, path)
    file = read_adapter_file(path)
    loaded: dict[str, Adapter] = {}
    tokens = None
    try:
        for part in file.parts:
            loaded[part] = load_part(_model(model, part, file), file, part)
        if file.tokens:
            try:
                tokens = insert_tokens(model, file.tokens)
            except UserError as exc:
                raise UserError(f"adapter file '{file.path}': {exc}") from None
    except BaseException:
        for adapter in loaded.values():
            adapter.detach()
        raise
    adapter = PipelineAdapter(model, loaded, tokens)
    adapter.metadata = file.metadata
    return adapter


def _model(pipe: Any, part: str, file: AdapterFile) -> nn.Module:
    try:
        return part_model(pipe, part)
    except UserError as exc:
        raise UserError(f"adapter file '{file.path}': {exc}") from None
