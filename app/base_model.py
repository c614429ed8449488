"""The base model the app generates with: loaded once, shared under a lock, with an offline fallback.

When the requested model cannot be loaded (no network, no local copy: `load_pipeline` raises one
of `personalize.errors.USER_ERRORS`), the app falls back to the built-in `shapes` model (pretrained offline, it
learns a concept on a CPU in minutes) and keeps the reason for a banner.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from personalize import load_pipeline
from personalize.base_models import BUILTIN_DESCRIPTIONS, BUILTIN_MODELS
from personalize.errors import USER_ERRORS, user_message
from personalize.models import load_unet
from personalize.shapes import recipe
from personalize.train import TrainConfig
from personalize.training.text_side import build_adapter

FALLBACK_MODEL = "shapes"


class BaseModel:
    """The loaded pipeline, its name, and why it is not the requested one (if so)."""

    def __init__(self, requested: str) -> None:
        self.requested = requested
        self.name = requested
        self.fallback_reason = ""  # why the requested model could not be loaded (the app then runs FALLBACK_MODEL)
        self.pipe: Any = None
        self.lock = threading.Lock()  # one user of the pipeline at a time (generation, size estimate)
        self._estimates: dict[tuple, tuple[int, int]] = {}

    def load(self) -> "BaseModel":
        try:
            self.pipe = load_pipeline(self.requested)
        except USER_ERRORS as exc:
            if self.requested == FALLBACK_MODEL:
                raise
            self.fallback_reason = user_message(exc)
            self.name = FALLBACK_MODEL
            self.pipe = load_pipeline(FALLBACK_MODEL)
        return self

    @property
    def banner(self) -> str:
        """One line saying that (and why) the app runs on the fallback model; empty when it does not."""
        if not self.fallback_reason:
            return ""
        return (
            f"The base model '{self.requested}' could not be loaded, so the app runs the built-in offline model "
            f"'{self.name}' ({self.description}). Reason: {self.fallback_reason}"
        )

    @property
    def description(self) -> str:
        """What the loaded model is, for a built-in one (empty for a user's model)."""
        return BUILTIN_DESCRIPTIONS.get(self.name, "")

    @property
    def embedders(self) -> str:
        """The evaluation embedder set that fits this model: the shapes judge for `shapes`, the offline
        stand-ins for the random-weight built-ins, the real backbones otherwise."""
        if self.name == "shapes":
            return "shapes"
        return "tiny" if self.name in BUILTIN_MODELS else "default"

    @property
    def validation_settings(self) -> dict:
        """TrainConfig fields for validation that fit this model: on `shapes`, prompts in its captions'
        language and its guidance (SD's "in the jungle" names nothing the shapes judge can check);
        none otherwise (the trainer's defaults)."""
        if self.name != "shapes":
            return {}
        return {"validation_prompts": list(recipe.VALIDATION_PROMPTS), "validation_guidance": recipe.GUIDANCE}

    @property
    def mask_model(self) -> str:
        """The segmentation model the form offers for masks: the offline random CLIPSeg on the built-in
        models (nothing is downloaded for a demo), the trainer's default otherwise."""
        return "tiny" if self.name in BUILTIN_MODELS else TrainConfig.mask_model

    @contextlib.contextmanager
    def model_of(self, base_model: str, whole: bool) -> Iterator[Any]:
        """`base_model` for work that leaves it as it was (an export): the loaded pipeline, held under
        the lock, when it is this model; otherwise that model's pipeline (`whole`) or bare UNet, loaded
        for the call."""
        if base_model == self.name:
            with self.lock:
                yield self.pipe
        else:
            yield load_pipeline(base_model) if whole else load_unet(base_model)

    def estimate(self, method: str, options: dict[str, Any], text_encoder: bool = False, token_vectors: int = 0) -> tuple[int, int]:
        """(trainable parameters, adapter file bytes) of `method` with `options` on this base model, with
        the text-encoder adapters and a learned token of that many vectors when asked.

        Builds the adapter as the trainer does, counts, saves it to a temporary file (the exact bytes of
        an untrained adapter file) and detaches it again; the pipeline is left bit-identical.
        """
        key = (method, repr(sorted(options.items())), text_encoder, token_vectors)
        if key not in self._estimates:
            config = TrainConfig(
                instance_images=[],
                output_dir="",
                method=method,
                method_options=options,
                train_text_encoder=text_encoder,
                token_vectors=token_vectors,
            )
            with self.lock:
                adapter = build_adapter(self.pipe, config)
                try:
                    with tempfile.TemporaryDirectory(prefix="personalize-estimate-") as folder:
                        path = Path(folder) / "adapter.safetensors"
                        adapter.save(str(path), {"base_model": self.name})
                        self._estimates[key] = (adapter.num_trainable, path.stat().st_size)
                finally:
                    adapter.detach()
        return self._estimates[key]
