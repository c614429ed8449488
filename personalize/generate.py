"""Generate images with zero, one or several adapters, each at its own strength.

Adapters are applied by summing their scaled deltas into the weights of each part they adapt, the
UNet and the text encoders (`W0 + sum_i s_i * delta_i`, the core's `merged_deltas`), with the original
tensors kept aside and put back afterwards, and the learned tokens their files hold are inserted for
the call (`tokens.tokens_inserted`) and removed after it: the pipeline (weights, tokenizers, embedding
modules) is the same after every call, and two adapters never need to share a layer slot.
Non-finite strengths are refused, and a render that turns non-finite (latents or images) stops with
a message instead of writing black images. Every PNG carries its
generation parameters as PNG text, and `manifest.jsonl` lists them (format: docs/training.md).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn

from .allocator import tune_cpu_allocator
from .atomic import atomic_path, write_text_atomic
from .data import check_resolution
from .errors import UserError
from .inject import check_scale, load_adapter, merged_deltas
from .io import MAIN_PART, PARTS, adapter_info, read_adapter_file
from .parts import is_pipeline, part_model, pipeline_parts
from .prompts import check_generation
from .tokens import tokens_inserted

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
BASE_DIR = "base"  # with compare=True: the same seeds without adapters
IMAGE_NAME_RE = re.compile(r"^(\d+)\.png$")


@dataclass
class AdapterSpec:
    """An adapter file and the strength it is applied with (0 = off, 1 = as trained)."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """'FILE' or 'FILE:SCALE' (a trailing ':number' is the scale; Windows drive letters are safe)."""
        path, sep, scale = text.rpartition(":")
        if sep:
            try:
                return cls(path, float(scale))
            except ValueError:
                pass
        return cls(text)


@dataclass
class GeneratedImage:
    """One generated image and what made it."""

    image: Image.Image
    path: str | None
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    base_model: str
    adapters: list[dict[str, Any]] = field(default_factory=list)  # path, scale, method, token, class_noun
    subject: str | None = None
    baseline: Image.Image | None = None  # the same seed without adapters (compare=True)
    baseline_path: str | None = None

    def record(self, file: str, adapters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The manifest / PNG-text record of this image (or of its baseline with `adapters=[]`)."""
        return {
            "file": file,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "base_model": self.base_model,
            "adapters": self.adapters if adapters is None else adapters,
            "subject": self.subject,
        }


def image_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Images (same size) laid out row by row, `cols` per row."""
    width, height = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * width, (i // cols) * height))
    return grid


def adapter_record(spec: AdapterSpec, info: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry of one adapter; `info` is its `adapter_info`."""
    metadata = info["metadata"]
    return {
        "path": str(spec.path),
        "scale": spec.scale,
        "method": info["method"],
        "token": metadata.get("token"),
        "class_noun": metadata.get("class_noun"),
    }


@contextmanager
def adapters_applied(pipe_or_unet: Any, specs: Sequence[AdapterSpec]) -> Iterator[None]:
    """Within the block each part's weights are `W0 + sum_i scale_i * delta_i` over the adapters that
    have that part, and their tokens are inserted; W0, the tokenizers and the embeddings are restored
    after. A bare UNet takes UNet-only adapters; others need the pipeline. Adapters at scale 0 are off
    entirely, tokens included."""
    files = [(read_adapter_file(spec.path), spec.scale) for spec in specs if spec.scale != 0.0]
    pipeline = is_pipeline(pipe_or_unet)
    models = {part: part_model(pipe_or_unet, part) for part in pipeline_parts(pipe_or_unet)} if pipeline else {MAIN_PART: pipe_or_unet}
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    for file, _ in files:
        missing = [part for part in file.parts if part not in models]
        if missing or (file.tokens and not pipeline):
            what = f"a {missing[0]} part" if missing else "learned tokens"
            model = "this pipeline" if pipeline else "a bare UNet"
            raise UserError(f"adapter '{file.path}' has {what}, which {model} cannot take; generate with its pipeline")
        for part, tokens in file.tokens.items():
            for token, value in tokens.items():
                if token in vectors.setdefault(part, {}):
                    raise UserError(f"token '{token}' is in two of the adapters (the second: '{file.path}'); apply one of them")
                vectors[part][token] = value
    with ExitStack() as stack:
        for part, model in models.items():
            updates = [(unscaled_deltas(model, file.path, part), scale) for file, scale in files if part in file.parts]
            stack.enter_context(merged_deltas(model, updates))
        if any(vectors.values()):
            stack.enter_context(tokens_inserted(pipe_or_unet, vectors))
        yield


# Adapter parts whose updates stay in (CPU) memory: a strength slider or a batch of prompts reuses them.
# Two adapters with every part (UNet and text encoders; a text encoder's updates are small beside the UNet's).
DELTA_CACHE_SIZE = 2 * len(PARTS)
_delta_cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()


def unscaled_deltas(model: nn.Module, path: str | Path, part: str = MAIN_PART) -> dict[str, torch.Tensor]:
    """delta (float32, on the CPU) per target layer of part `part` of the adapter file at `path`, as
    attached to `model` (that part's model: the UNet, or a text encoder's `parts.text_root`).

    Decomposition-based methods rebuild their bases from W0 on load (seconds on SD 1.5), so the
    result is cached per (file version, part, model)."""
    stat = Path(path).stat()
    weight = next(model.parameters())
    key = (
        str(Path(path).resolve()),
        stat.st_mtime_ns,
        stat.st_size,
        part,
        id(model),
        str(getattr(getattr(model, "config", None), "_name_or_path", "")),
        weight.dtype,
        str(weight.device),
    )
    if key in _delta_cache:
        _delta_cache.move_to_end(key)
        return _delta_cache[key]
    adapter = load_adapter(model, path, part=part)
    try:
        deltas = {name: delta.cpu() for name, delta in adapter.deltas().items()}  # scale 1
    finally:
        adapter.detach()
    _delta_cache[key] = deltas
    while len(_delta_cache) > DELTA_CACHE_SIZE:
        _delta_cache.popitem(last=False)
    return deltas


def generate(
    pipe_or_base_model,
    prompts: str | Sequence[str],
    *,
    adapters: Sequence[AdapterSpec] = (),
    negative_prompt: str = "",
    num_images: int = 1,
    seed: int = 0,
    steps: int = 30,
    guidance: float = 7.5,
    output_dir: str | Path | None = None,
    compare: bool = False,
    progress: Callable[[int, int], None] | None = None,
    subject: str | None = None,
    batch_size: int = 4,
    resolution: int | None = None,
) -> list[GeneratedImage]:
    """Render `num_images` images per prompt (image j of every prompt uses seed `seed + j`).

    Prompts may use {token} and {class_noun}; they are filled from the first adapter trained with
    them. With `output_dir`, PNGs (parameters in PNG text) and `manifest.jsonl` are written there;
    a folder that already has a manifest is extended, not overwritten. `compare=True` also renders
    every seed without adapters (into `base/`) and writes one with/without grid per prompt.
    """
    tune_cpu_allocator()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    specs = [AdapterSpec(str(a.path), check_scale(a.scale, f"the scale of adapter '{a.path}'")) for a in adapters]
    _check_arguments(prompts, num_images, steps, guidance, batch_size, resolution)
    check_generation(prompts, seed, num_images)  # unknown {placeholders}, seeds outside 0..MAX_SEED
    infos = [adapter_info(spec.path) for spec in specs]  # fails fast on a missing or foreign file
    records = [adapter_record(spec, info) for spec, info in zip(specs, infos)]
    prompts = [_fill_placeholders(p, records) for p in prompts]
    pipe = _pipeline(pipe_or_base_model)
    base_model = str(getattr(pipe.unet.config, "_name_or_path", "") or "")
    for spec, info in zip(specs, infos):
        if info["base_model"] and base_model and info["base_model"] != base_model:
            log.warning("adapter %s was trained on '%s', generating with '%s'", spec.path, info["base_model"], base_model)

    folder = Path(output_dir).expanduser() if output_dir is not None else None
    writer = _Writer(folder) if folder is not None else None
    batches = [
        (prompt, [seed + j for j in range(start, min(num_images, start + batch_size))])
        for prompt in prompts
        for start in range(0, num_images, batch_size)
    ]
    total, done = len(prompts) * num_images * (2 if compare else 1), 0  # images
    results: list[GeneratedImage] = []
    if progress is not None:
        progress(0, total)  # start the clock before the first batch, so rate and ETA are real
    with adapters_applied(pipe, specs):
        for prompt, seeds in batches:
            images = _render(pipe, prompt, negative_prompt, seeds, steps, guidance, resolution, failure_cause(specs))
            items = [
                GeneratedImage(image, None, prompt, negative_prompt, image_seed, steps, guidance, base_model, records, subject)
                for image, image_seed in zip(images, seeds)
            ]
            if writer is not None:
                writer.write(items)
            results += items
            done += len(seeds)
            if progress is not None:
                progress(done, total)
    if compare:
        position = 0
        for prompt, seeds in batches:
            items = results[position : position + len(seeds)]
            position += len(seeds)
            for item, baseline in zip(items, _render(pipe, prompt, negative_prompt, seeds, steps, guidance, resolution, failure_cause([]))):
                item.baseline = baseline
            if writer is not None:
                writer.write_baselines(items)
            done += len(seeds)
            if progress is not None:
                progress(done, total)
        if writer is not None:
            for p in range(len(prompts)):
                writer.write_grid(results[p * num_images : (p + 1) * num_images])
    return results


def _check_arguments(prompts, num_images, steps, guidance, batch_size, resolution) -> None:
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise UserError(f"give at least one non-empty prompt, got {prompts!r}")
    for name, value in (("num_images", num_images), ("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if not math.isfinite(guidance) or guidance < 0:
        raise UserError(f"guidance must be a non-negative number, got {guidance}")
    check_resolution(resolution)


def _fill_placeholders(prompt: str, records: list[dict[str, Any]]) -> str:
    if "{token}" not in prompt and "{class_noun}" not in prompt:
        return prompt
    source = next((r for r in records if r["token"]), None)
    if source is None:
        raise UserError(f"prompt '{prompt}' uses {{token}}/{{class_noun}}, but no adapter carries a token; write the words out")
    return prompt.replace("{token}", source["token"]).replace("{class_noun}", source["class_noun"] or "")


def _pipeline(pipe_or_base_model):
    if isinstance(pipe_or_base_model, (str, Path)):
        from .models import load_pipeline

        return load_pipeline(str(pipe_or_base_model))
    return pipe_or_base_model


@torch.no_grad()
def _render(pipe, prompt, negative_prompt, seeds, steps, guidance, resolution, cause: str) -> list[Image.Image]:
    """The pipeline's images for `seeds`; a UserError naming `cause` (the likely reason) as soon as the
    latents, or the decoded images, hold NaN or infinite values (they would come out black)."""

    def check_latents(pipe, step: int, timestep, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not bool(torch.isfinite(tensors["latents"]).all()):
            raise UserError(f"generation stopped at step {step + 1} of {steps}: the latents became NaN or infinite; {cause}")
        return tensors

    size = {"height": resolution, "width": resolution} if resolution else {}
    images = pipe(
        prompt=[prompt] * len(seeds),
        negative_prompt=[negative_prompt] * len(seeds) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],  # CPU noise: same images on any device
        output_type="np",
        callback_on_step_end=check_latents,
        callback_on_step_end_tensor_inputs=["latents"],
        **size,
    ).images  # (batch, height, width, 3) floats in [0, 1]
    if not np.isfinite(images).all():
        raise UserError(f"generation produced NaN or infinite pixels when decoding the latents; {cause}")
    return pipe.numpy_to_pil(images)


def failure_cause(specs: Sequence[AdapterSpec]) -> str:
    """The likely reason a render turns non-finite, for the error message."""
    active = [f"'{s.path}' at {s.scale:g}" for s in specs if s.scale != 0.0]
    if active:
        return f"the adapter strengths are the likely cause ({', '.join(active)}): try a strength nearer 1, or check the adapter"
    return "the base model itself produced them (a 16-bit VAE or UNet overflowing? try float32)"


class _Writer:
    """PNG files with text metadata; manifest.jsonl rewritten atomically after every batch."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.manifest = _read_lines(folder / MANIFEST)
        self.base_manifest = _read_lines(folder / BASE_DIR / MANIFEST)
        used = [int(m.group(1)) for p in folder.iterdir() if (m := IMAGE_NAME_RE.match(p.name))]
        self.next_index = max(used, default=-1) + 1

    def write(self, items: list[GeneratedImage]) -> None:
        for item in items:
            name = f"{self.next_index:04d}.png"
            self.next_index += 1
            record = item.record(name)
            item.path = str(_save_png(item.image, self.folder / name, record))
            self.manifest.append(json.dumps(record))
        write_text_atomic(self.folder / MANIFEST, "".join(line + "\n" for line in self.manifest))

    def write_baselines(self, items: list[GeneratedImage]) -> None:
        for item in items:
            name = Path(item.path).name
            record = item.record(name, adapters=[])
            item.baseline_path = str(_save_png(item.baseline, self.folder / BASE_DIR / name, record))
            self.base_manifest.append(json.dumps(record))
        write_text_atomic(self.folder / BASE_DIR / MANIFEST, "".join(line + "\n" for line in self.base_manifest))

    def write_grid(self, items: list[GeneratedImage]) -> None:
        """Top row: without adapters; bottom row: with them, same seeds."""
        grid = image_grid([i.baseline for i in items] + [i.image for i in items], cols=len(items))
        with atomic_path(self.folder / f"compare_{Path(items[0].path).stem}.png") as tmp:
            grid.save(tmp, format="PNG")


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def _save_png(image: Image.Image, path: Path, record: dict[str, Any]) -> Path:
    info = PngInfo()
    for key, value in record.items():
        if key != "file" and value is not None:
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("parameters", json.dumps(record))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
