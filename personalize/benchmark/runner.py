"""Run the benchmark: one UNet, every method attached in turn, timings interleaved across methods.

Set-up, per method: attach cold (timed: the decompositions computed and cached), detach, attach
warm (timed: read from the cache), count, save (file size), one training step that chooses each
layer's forward form (adapters/forms.py), warm-up training steps (the first one measures peak
memory); then the adapter is parked (its layers are unhooked, its tensors kept).
Training rounds: every method in turn (the order rotating each round) is re-installed and runs one
timed training step, so machine drift (thermal, other jobs) hits all methods alike.
Inference rounds, likewise: an untimed and a timed forward of the base UNet, then merge, an untimed
and a timed forward, unmerge; the ratio pairs each merged forward with the base forward just before
it (kept apart from the training rounds, so no forward is timed in the aftermath of a training step).
With `--text-encoder` (text_workload.py) each method also gets an adapter on the text encoder(s):
its set-up then warms up and measures the memory of the step through both adapters as well, and each
training round times that step back to back with the method's UNet-only step.
With a time limit (budget.py) methods past a share of it are not set up (listed as skipped) and
fewer rounds run, the same number for every method.
Only one UNet is ever held.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters.decompositions import decomposition_cache
from ..adapters.forms import form_choice
from ..adapters.slots import Slot
from ..allocator import tune_cpu_allocator
from ..inject import Adapter, attach
from .budget import TimeLimit
from .config import FLOOR, REFERENCE, BenchConfig, MethodSpec, resolve_specs
from .environment import environment, load_average
from .memory import MB, PeakMemory
from .profiling import layer_table, operator_table, write_profile
from .text_workload import TextEncoders, has_text_target
from .workload import Condition, Workload, latent_size, unet_inputs

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (units done, units in all, what runs now)


@dataclass
class TextResult:
    """The method with its adapter on the text encoder(s) too (text_workload.py); lists hold one value per round."""

    target: bool = True  # False: the method adapts no Linear layer, the only kind a text encoder has (filter_atoms)
    trainable: int = 0  # the text-encoder adapters' tensors (the UNet adapter's are MethodResult.trainable)
    memory_mb: float = 0.0  # peak over the frozen models at rest: both adapters, their optimiser states, activations
    train_s: list[float] = field(default_factory=list)
    train_cpu_s: list[float] = field(default_factory=list)
    train_median_s: float = 0.0
    train_ratio_unet: float = 0.0  # median over rounds of (this step / the method's UNet-only step), paired within a round
    train_cpu_ratio_unet: float = 0.0  # the same ratio on CPU seconds
    memory_ratio_unet: float | None = None  # memory_mb / the method's UNet-only memory_mb (None when that is 0)
    memory_added_mb: float = 0.0  # memory_mb - the method's UNet-only memory_mb


@dataclass
class MethodResult:
    """Measurements of one method; lists hold one value per timed round."""

    label: str
    method: str
    options: dict[str, Any]
    trainable: int = 0
    file_bytes: int = 0
    attach_s: float = 0.0  # cold: decompositions computed (and written to the cache)
    attach_warm_s: float = 0.0  # warm: decompositions read from the cache (adapters/decompositions.py)
    forms: dict[str, int] = field(default_factory=dict)  # layers per forward form in the last training step (adapters/forms.py)
    memory_mb: float = 0.0  # peak over the frozen model at rest: adapter tensors, optimiser state, activations
    train_s: list[float] = field(default_factory=list)
    inference_s: list[float] = field(default_factory=list)
    train_cpu_s: list[float] = field(default_factory=list)  # process CPU seconds (see Workload.timed)
    inference_cpu_s: list[float] = field(default_factory=list)
    inference_base_s: list[float] = field(default_factory=list)  # the base UNet, timed just before each merged step
    train_median_s: float = 0.0
    train_ratio_lora: float = 0.0  # median over rounds of (this method / LoRA), paired within a round
    train_ratio_floor: float = 0.0
    train_cpu_ratio_lora: float = 0.0  # the same ratio on CPU seconds
    inference_median_s: float = 0.0
    inference_ratio_base: float = 0.0  # median of merged model / base UNet timed just before it
    text_encoder: TextResult | None = None  # measured with --text-encoder (not for the floor)


class Part:
    """One adapter of a method on one model (the UNet or a text encoder): attached once, then parked
    and re-installed each round."""

    def __init__(self, attach_to: Callable[[], Adapter]) -> None:
        self.attach_to = attach_to
        self.adapter: Adapter | None = None
        self.optimiser: torch.optim.Optimizer | None = None
        self.parked = False

    def attach(self, cache: str = "use") -> None:
        with warnings.catch_warnings(), decomposition_cache(cache):
            # peft leaves its config on the model after a detach and warns when LoRA is attached again
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.adapter = self.attach_to()
        self.optimiser = torch.optim.AdamW(self.adapter.parameter_groups())

    def num_trainable(self) -> int:
        assert self.adapter is not None
        return self.adapter.num_trainable

    def reinstallable(self) -> bool:
        assert self.adapter is not None
        return all(type(slot).install is not Slot.install for slot in self.adapter.slots.values())

    def park(self) -> None:
        """Unhook the adapter from its model, keeping its tensors when its slots can be re-installed."""
        if self.adapter is None or self.parked:
            return
        if self.reinstallable():
            for slot in self.adapter.slots.values():
                slot.remove()
        else:  # e.g. peft's LoRA layers: detach, attach again next round (cheap for LoRA)
            self.adapter.detach()
            self.adapter = self.optimiser = None
        self.parked = True

    def activate(self) -> None:
        if not self.parked:
            return
        if self.adapter is None:
            self.attach()
        else:
            for slot in self.adapter.slots.values():
                slot.install()
        self.parked = False

    def detach(self) -> None:
        """Leave the model as it was (a LoRA parked by detaching is already gone)."""
        if self.adapter is None:
            return
        self.activate()
        self.adapter.detach()
        self.adapter = self.optimiser = None


class Candidate:
    """A method during the run: its UNet part (none for the floor) and, when the text encoders are
    measured, one part per text encoder (none for a method without a text-encoder target)."""

    def __init__(self, spec: MethodSpec, unet: torch.nn.Module, text: TextEncoders | None = None) -> None:
        self.spec = spec
        self.unet = None if spec.is_floor else Part(lambda: attach(unet, spec.name, **spec.options))
        self.result = MethodResult(spec.label, spec.name, dict(spec.options))
        self.text: list[Part] = []
        self.condition: Condition | None = None
        if text is not None and not spec.is_floor:
            target = has_text_target(spec.name)
            self.result.text_encoder = TextResult(target=target)
            if target:
                self.text = [Part(attach_to) for attach_to in text.attachers(spec.name, spec.options)]
                self.condition = text.condition

    @property
    def adapter(self) -> Adapter | None:
        """The UNet's adapter (None for the floor, and while parked by detaching)."""
        return None if self.unet is None else self.unet.adapter

    def parts(self, with_text: bool = True) -> list[Part]:
        return ([] if self.unet is None else [self.unet]) + (self.text if with_text else [])

    def train_step(self, work: Workload, with_text: bool = False) -> None:
        """The UNet-only training step, or (`with_text`) the step through the adapted text encoder(s) too."""
        optimisers = [part.optimiser for part in self.parts(with_text)]
        assert all(o is not None for o in optimisers), "a training step of a parked candidate"
        work.train_step(optimisers, self.condition if with_text else None)

    def park(self) -> None:
        for part in self.parts():
            part.park()

    def activate(self) -> None:
        for part in self.parts():
            part.activate()

    def merge(self) -> None:
        if self.adapter is not None:
            self.adapter.merge()

    def unmerge(self) -> None:
        if self.adapter is not None:
            self.adapter.unmerge()

    def detach(self) -> None:
        for part in self.parts():
            part.detach()


def run_benchmark(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every method of `config`; returns the record that `bench.json` stores. The caller's
    thread count and random state are left as they were."""
    config.validate()
    tune_cpu_allocator()  # else each method's times depend on what the process freed before it
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]), form_choice(config.forms):
            torch.manual_seed(config.seed)
            return _run(config, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig, progress: Progress | None) -> dict[str, Any]:
    from ..models import load_pipeline

    specs = resolve_specs(config.methods)
    device = config.torch_device()
    compute = config.autocast_dtype(device)
    started = time.perf_counter()
    load_before = load_average()

    pipe = load_pipeline(config.base_model, device=device, dtype=compute)  # frozen weights in the compute dtype
    unet, vae_factor = pipe.unet, pipe.vae_scale_factor
    text = TextEncoders(pipe, config.base_model, config.batch, device) if config.text_encoder else None
    del pipe  # the VAE is not benchmarked (nor, without --text-encoder, the text encoder)
    size = latent_size(unet, config.resolution, vae_factor)
    unet.requires_grad_(False)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()  # dropout is 0 in SD UNets; train mode matters for gradient checkpointing
    inputs = unet_inputs(unet, config.batch, size, unet.dtype, device, config.seed)
    work = Workload(unet, inputs, compute, device)
    load_s = time.perf_counter() - started
    base_memory = PeakMemory(device).current()

    candidates = [Candidate(spec, unet, text) for spec in specs]
    limit = TimeLimit(config.time_limit, started)
    skipped: list[str] = []  # methods not set up within the time limit
    total = len(candidates) * (1 + 2 * config.steps + (config.profile_dir is not None))
    done = 0

    def report(label: str) -> None:
        if progress is not None:
            progress(done, total, label)

    with tempfile.TemporaryDirectory(prefix="personalize-bench-") as tmp:
        for index, candidate in enumerate(candidates):
            if not limit.may_set_up(index):
                skipped = [c.spec.label for c in candidates[index:]]
                log.info("time limit: %s not measured", ", ".join(skipped))
                del candidates[index:]
                break
            report(f"set up {candidate.spec.label}")
            set_up(candidate, work, device, Path(tmp), config.warmup)
            done += 1

    def train(round_index: int, candidate: Candidate) -> None:
        nonlocal done
        report(f"train round {round_index + 1}/{config.steps}: {candidate.spec.label}")
        candidate.activate()
        train_round(candidate, work, round_index)
        candidate.result.forms = forms_used(candidate)
        candidate.park()
        done += 1

    def infer(round_index: int, candidate: Candidate) -> None:
        nonlocal done
        report(f"inference round {round_index + 1}/{config.steps}: {candidate.spec.label}")
        work.inference_step()  # untimed, as after a merge: the previous method's weights were just swapped out
        base_wall, _ = work.timed(work.inference_step)  # every adapter parked: the base UNet, right now
        candidate.result.inference_base_s.append(base_wall)
        candidate.activate()
        candidate.merge()
        work.inference_step()  # untimed: the merge has just replaced the weights
        wall, cpu = work.timed(work.inference_step)
        candidate.result.inference_s.append(wall)
        candidate.result.inference_cpu_s.append(cpu)
        candidate.unmerge()
        candidate.park()
        done += 1

    train_rounds = _rounds(candidates, config.steps, limit.another_training_round, train)
    inference_rounds = _rounds(candidates, train_rounds, limit.another_inference_round, infer)
    if config.profile_dir is not None:
        for candidate in candidates:
            report(f"profile {candidate.spec.label}")
            candidate.activate()
            operators = operator_table(lambda candidate=candidate: candidate.train_step(work), device)
            layers = None if candidate.adapter is None else layer_table(candidate.adapter, work)
            write_profile(config.profile_dir, candidate.spec.label, operators, layers)
            candidate.park()
            done += 1
    report("done")
    for candidate in candidates:
        candidate.detach()

    results = [c.result for c in candidates]
    summarise(results)
    env = environment(device, compute, unet.dtype)
    env["load_average_before"] = load_before
    return {
        "format": "personalize.bench",
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {**asdict(config), "methods": [s.label for s in specs], "latent_size": size},
        "environment": env,
        "base_memory_mb": round(base_memory / MB, 1),
        "load_s": round(load_s, 2),
        "total_s": round(time.perf_counter() - started, 2),
        "text_encoders": {} if text is None else text.sizes(),  # parameters of each text encoder measured
        "timed_rounds": {"train": train_rounds, "inference": inference_rounds},  # fewer than `steps` when the time limit cut them
        "skipped": skipped,  # methods left out by the time limit
        "results": [asdict(r) for r in results],
    }


def set_up(candidate: Candidate, work: Workload, device: torch.device, folder: Path, warmup: int) -> None:
    """Attach (timed), count, save, warm up (the first step measures peak memory); then the same for the
    step with the text encoder(s) training too, where measured; then park."""
    result = candidate.result
    peak = PeakMemory(device)
    peak.mark()  # both peaks are over the frozen models at rest
    unet = candidate.unet
    if unet is not None:
        result.attach_s = work.timed(lambda: unet.attach("refresh"))[0]
        unet.detach()
        result.attach_warm_s = work.timed(unet.attach)[0]
        assert unet.adapter is not None
        result.trainable = unet.adapter.num_trainable
        path = folder / "adapter.safetensors"
        unet.adapter.save(str(path))
        result.file_bytes = path.stat().st_size
        log.debug(
            "%s: attached in %.1f s cold, %.1f s warm, %d trainable, %d bytes saved",
            result.label,
            result.attach_s,
            result.attach_warm_s,
            result.trainable,
            result.file_bytes,
        )
    result.memory_mb = warm_up(lambda: candidate.train_step(work), peak, warmup)
    if candidate.text:
        assert result.text_encoder is not None
        for part in candidate.text:
            part.attach()
        result.text_encoder.trainable = sum(part.num_trainable() for part in candidate.text)
        result.text_encoder.memory_mb = warm_up(lambda: candidate.train_step(work, with_text=True), peak, warmup)
    candidate.park()


def warm_up(step: Callable[[], None], peak: PeakMemory, steps: int) -> float:
    """Untimed: one `step()` that chooses each layer's form, then `steps` more, the first under `peak`
    (which it returns, in MB)."""
    step()
    with peak:
        step()
    for _ in range(steps - 1):
        step()
    return round(peak.bytes / MB, 1)


def train_round(candidate: Candidate, work: Workload, round_index: int) -> None:
    """The candidate's timed training step(s) of one round: UNet-only, and with the text encoder(s) where
    measured, back to back in an order alternating with the round, so each pair sees the same machine."""
    kinds = [False, True] if candidate.text else [False]
    if round_index % 2:
        kinds.reverse()
    for with_text in kinds:
        wall, cpu = work.timed(lambda with_text=with_text: candidate.train_step(work, with_text))
        timings = candidate.result.text_encoder if with_text else candidate.result
        assert timings is not None
        timings.train_s.append(wall)
        timings.train_cpu_s.append(cpu)


def forms_used(candidate: Candidate) -> dict[str, int]:
    """How many layers ran each forward form (slots without a choice, e.g. peft's, are left out)."""
    if candidate.adapter is None:
        return {}
    used = Counter(getattr(slot, "form", "") for slot in candidate.adapter.slots.values())
    used.pop("", None)
    return dict(sorted(used.items()))


def _rotated(candidates: list[Candidate], round_index: int) -> list[Candidate]:
    """Each round starts one method later, so no method always follows the same one."""
    shift = round_index % len(candidates)
    return candidates[shift:] + candidates[:shift]


def _rounds(candidates: list[Candidate], count: int, fits: Callable[[int, float], bool], step: Callable[[int, Candidate], None]) -> int:
    """Up to `count` rounds of `step(round_index, candidate)` over every candidate (each round rotated),
    each started only while `fits(rounds done, their seconds)`; returns the rounds run."""
    began = time.perf_counter()
    for round_index in range(count):
        if not fits(round_index, time.perf_counter() - began):
            return round_index
        for candidate in _rotated(candidates, round_index):
            step(round_index, candidate)
    return count


def _paired(values: list[float], reference: list[float]) -> float:
    return statistics.median(v / r for v, r in zip(values, reference, strict=True))


def summarise(results: list[MethodResult]) -> None:
    """Medians and round-paired ratios to LoRA (training), the floor (training) and the base UNet (inference)."""
    by_label = {r.label: r for r in results}
    lora, floor = by_label[REFERENCE], by_label[FLOOR]
    for r in results:
        r.train_median_s = statistics.median(r.train_s)
        r.inference_median_s = statistics.median(r.inference_s)
        r.train_ratio_lora = _paired(r.train_s, lora.train_s)
        r.train_ratio_floor = _paired(r.train_s, floor.train_s)
        r.train_cpu_ratio_lora = _paired(r.train_cpu_s, lora.train_cpu_s)
        r.inference_ratio_base = _paired(r.inference_s, r.inference_base_s)
        if r.text_encoder is not None and r.text_encoder.target:
            summarise_text(r.text_encoder, r)


def summarise_text(text: TextResult, unet_only: MethodResult) -> None:
    """Median and round-paired ratios of the step with the text encoder(s) to the same method's UNet-only step."""
    text.train_median_s = statistics.median(text.train_s)
    text.train_ratio_unet = _paired(text.train_s, unet_only.train_s)
    text.train_cpu_ratio_unet = _paired(text.train_cpu_s, unet_only.train_cpu_s)
    text.memory_ratio_unet = text.memory_mb / unet_only.memory_mb if unet_only.memory_mb > 0 else None
    text.memory_added_mb = round(text.memory_mb - unet_only.memory_mb, 1)
