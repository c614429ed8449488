"""What `personalize bench` measures: the methods (with options) and the run settings, checked where
they enter so a typo fails before a 3.4 GB UNet is built. Importing it loads no torch (the CLI's help
shows these defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..adapters import get_method, method_names
from ..errors import UserError

if TYPE_CHECKING:
    import torch

FLOOR = "none"  # frozen UNet, gradients to the input latents only: the cheapest training step possible
REFERENCE = "lora"  # every ratio is taken to peft LoRA r=4 (ADAPTERS.md "Baseline: LoRA")
REFERENCE_OPTIONS = {"rank": 4, "alpha": 4.0}
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # name -> torch dtype


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked configuration: a method name (or `none`) plus options, shown as `label`."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def is_floor(self) -> bool:
        return self.name == FLOOR


def parse_method_spec(text: str) -> MethodSpec:
    """`svfit`, `lora:rank=8` or `atoms:preset=c3,m1=2` (values as in `personalize train --option`)."""
    name, _, rest = text.strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise UserError(f"bad method option '{item}' in '{text}'; expected name:key=value[,key=value]")
        options[key] = _literal(value)
    if name == FLOOR:
        if options:
            raise UserError(f"'{FLOOR}' (the frozen-UNet floor) takes no options, got '{text}'")
    else:
        get_method(name).make_config(dict(options))  # unknown method / option / preset -> UserError
    return MethodSpec(name, options, text.strip())


def _literal(value: str) -> Any:
    """A TOML literal (8, 0.5, true, "x"), `none` for None, anything else as text (as `train --option`)."""
    import tomllib

    if value.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def resolve_specs(texts: Sequence[str] | None) -> list[MethodSpec]:
    """The floor and the LoRA reference first, then the requested methods (default: all registered)."""
    reference = MethodSpec(REFERENCE, dict(REFERENCE_OPTIONS), REFERENCE)
    if not texts:
        texts = [name for name in method_names() if name != REFERENCE]
    specs = [MethodSpec(FLOOR, {}, FLOOR), reference]
    for text in texts:
        spec = parse_method_spec(text)
        if spec.label in (FLOOR, REFERENCE):
            continue  # always measured
        if any(s.label == spec.label for s in specs):
            raise UserError(f"method '{spec.label}' is listed twice")
        specs.append(spec)
    return specs


@dataclass
class BenchConfig:
    """Settings of one benchmark run (the CLI's options)."""

    methods: list[str] | None = None  # None = every registered method (the floor and LoRA are always added)
    base_model: str = "sd15-random"  # SD 1.5's UNet with random weights: SD 1.5's cost, offline, no download
    resolution: int = 256  # image pixels; 256 keeps a CPU step near 2 s while every UNet level still runs
    batch: int = 1  # DreamBooth trains on one image per step
    steps: int = 10  # timed train (and merged-inference) steps per method, one per interleaved round
    warmup: int = 2  # untimed steps per method first (allocator, optimiser state, caches); the first measures memory
    device: str | None = None  # None = CUDA, then MPS, then CPU
    precision: str = "auto"  # fp32 | fp16 | bf16 autocast; auto = fp16 on GPUs (what SD ships), fp32 on CPU
    gradient_checkpointing: bool = False  # recompute activations in backward (the delta is then composed twice)
    threads: int | None = None  # CPU threads for torch; None = torch's default
    seed: int = 0  # inputs and random UNet weights
    forms: str = "measure"  # how each layer's forward form is chosen: measure (timed per machine) | model (multiply-adds)
    profile_dir: str | None = None  # folder for per-method profiles: operators and per-layer replay (after the timed rounds)
    text_encoder: bool = False  # also time each method's step with its adapter on the text encoder(s) too (text_workload.py)
    time_limit: float | None = None  # seconds for the run (model load to last timed step; runner.TimeLimit); None = no limit

    def validate(self) -> None:
        from ..adapters.forms import MODES as FORM_MODES

        for name in ("resolution", "batch", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"bench {name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise UserError(f"bench warmup must be a positive integer (its first step measures memory), got {self.warmup!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UserError(f"bench threads must be a positive integer, got {self.threads!r}")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}'; accepted: auto, {', '.join(PRECISIONS)}")
        if self.time_limit is not None and (isinstance(self.time_limit, bool) or not self.time_limit > 0):
            raise UserError(f"bench time limit must be a positive number of seconds, got {self.time_limit!r}")
        if self.profile_dir is not None and Path(self.profile_dir).exists() and not Path(self.profile_dir).is_dir():
            raise UserError(f"bench profile folder '{self.profile_dir}' is a file; accepted: a folder (created if missing)")
        if self.forms not in FORM_MODES:
            raise UserError(f"unknown form choice '{self.forms}'; accepted: {', '.join(FORM_MODES)}")
        resolve_specs(self.methods)
        self.torch_device()

    def torch_device(self) -> torch.device:
        """The device to measure on; an unknown or unavailable one is a one-line UserError."""
        from ..models import resolve_device

        return resolve_device(self.device)

    def autocast_dtype(self, device: torch.device) -> torch.dtype:
        """The compute dtype: float32 means no autocast."""
        import torch

        if self.precision == "auto":
            return torch.float16 if device.type in ("cuda", "mps") else torch.float32
        return getattr(torch, PRECISIONS[self.precision])
