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
from .config import FLOOR, REFERENCE, BenchConfig, MethodSpec, resolve_specs
from .environment import environment, load_average
from .memory import MB, PeakMemory
from .profiling import layer_table, operator_table, write_profile
from .workload import Workload, latent_size, unet_inputs

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (units done, units in all, what runs now)


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


class Candidate:
    """A method during the run: attached once, then parked and re-installed each round."""

    def __init__(self, spec: MethodSpec, unet: torch.nn.Module) -> None:
        self.spec, self.unet = spec, unet
        self.adapter: Adapter | None = None
        self.optimiser: torch.optim.Optimizer | None = None
        self.parked = False
        self.result = MethodResult(spec.label, spec.name, dict(spec.options))

    def attach(self, cache: str = "use") -> None:
        with warnings.catch_warnings(), decomposition_cache(cache):
            # peft leaves its config on the model after a detach and warns when LoRA is attached again
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.adapter = attach(self.unet, self.spec.name, **self.spec.options)
        self.optimiser = torch.optim.AdamW(self.adapter.parameter_groups())

    def reinstallable(self) -> bool:
        assert self.adapter is not None
        return all(type(slot).install is not Slot.install for slot in self.adapter.slots.values())

    def park(self) -> None:
        """Unhook the adapter from the UNet, keeping its tensors when its slots can be re-installed."""
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

    def merge(self) -> None:
        if self.adapter is not None:
            self.adapter.merge()

    def unmerge(self) -> None:
        if self.adapter is not None:
            self.adapter.unmerge()

    def detach(self) -> None:
        """Leave the UNet as it was (a LoRA parked by detaching is already gone)."""
        if self.adapter is None:
            return
        self.activate()
        self.adapter.detach()
        self.adapter = self.optimiser = None


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
    del pipe  # the text encoder and VAE are not benchmarked
    size = latent_size(unet, config.resolution, vae_factor)
    unet.requires_grad_(False)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()  # dropout is 0 in SD UNets; train mode matters for gradient checkpointing
    inputs = unet_inputs(unet, config.batch, size, unet.dtype, device, config.seed)
    work = Workload(unet, inputs, compute, device)
    load_s = time.perf_counter() - started
    base_memory = PeakMemory(device).current()

    candidates = [Candidate(spec, unet) for spec in specs]
    total = len(candidates) * (1 + 2 * config.steps + (config.profile_dir is not None))
    done = 0

    def report(label: str) -> None:
        if progress is not None:
            progress(done, total, label)

    with tempfile.TemporaryDirectory(prefix="personalize-bench-") as tmp:
        for candidate in candidates:
            report(f"set up {candidate.spec.label}")
            set_up(candidate, work, device, Path(tmp), config.warmup)
            done += 1
    rounds = [(r, c) for r in range(config.steps) for c in _rotated(candidates, r)]
    for round_index, candidate in rounds:
        report(f"train round {round_index + 1}/{config.steps}: {candidate.spec.label}")
        candidate.activate()
        wall, cpu = work.timed(lambda candidate=candidate: work.train_step(candidate.optimiser))
        candidate.result.train_s.append(wall)
        candidate.result.train_cpu_s.append(cpu)
        candidate.result.forms = forms_used(candidate)
        candidate.park()
        done += 1
    for round_index, candidate in rounds:
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
    if config.profile_dir is not None:
        for candidate in candidates:
            report(f"profile {candidate.spec.label}")
            candidate.activate()
            operators = operator_table(lambda candidate=candidate: work.train_step(candidate.optimiser), device)
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
        "results": [asdict(r) for r in results],
    }


def set_up(candidate: Candidate, work: Workload, device: torch.device, folder: Path, warmup: int) -> None:
    """Attach (timed), count, save, warm up (the first step measures peak memory), then park."""
    result = candidate.result
    peak = PeakMemory(device)
    peak.mark()
    if not candidate.spec.is_floor:
        result.attach_s = work.timed(lambda: candidate.attach("refresh"))[0]
        candidate.detach()
        result.attach_warm_s = work.timed(candidate.attach)[0]
        assert candidate.adapter is not None
        result.trainable = candidate.adapter.num_trainable
        path = folder / "adapter.safetensors"
        candidate.adapter.save(str(path))
        result.file_bytes = path.stat().st_size
        log.debug(
            "%s: attached in %.1f s cold, %.1f s warm, %d trainable, %d bytes saved",
            result.label,
            result.attach_s,
            result.attach_warm_s,
            result.trainable,
            result.file_bytes,
        )
    work.train_step(candidate.optimiser)  # untimed, outside the memory peak: the first step chooses each layer's form
    with peak:
        work.train_step(candidate.optimiser)
    result.memory_mb = round(peak.bytes / MB, 1)
    for _ in range(warmup - 1):
        work.train_step(candidate.optimiser)
    candidate.park()


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
