"""Which exact form runs an adapted layer: measured once per machine, or by the multiply-add model.

A slot can compute its layer's adapted output in several exact ways ("forms"): compose
`W0 + scale * delta` and run one matmul ("weight"), run the frozen layer and add `x` through the
update's factors ("activations", as LoRA), run `x` through factors of the whole adapted weight
("full"), or a method's own (filter atoms' two-stage convolution, Kronecker atoms' per-block
form). They differ in speed, not in result (to float rounding), and which is fastest depends on the
machine: multiply-add counts rank them differently from CPU cache sizes and GPU kernels.

Modes (`PERSONALIZE_FORMS` or `form_choice()`):
- `measure` (default): the first call with a new key (the slot's layer and adapter shapes, the
  input's shape, dtype and compute dtype, training or not) times every form (one warm-up, then
  `REPEATS` runs, forward plus, when training, the backward to the trainable tensors and the input,
  without touching `.grad`), keeps the fastest, and stores the choice in memory and in
  `<cache>/forms/<machine>.json`, keyed by the device's name (CPU model and thread count, or GPU
  model) and the torch version; later calls and later runs reuse it. A cache entry naming a form the
  slot does not offer is ignored and measured again; an unreadable file is ignored and rewritten.
- `model`: the form with the fewest multiply-adds from each form's cost model (deterministic; tests
  use it). Forms without a cost (variants of the same multiply-adds) are candidates only when measuring.
Inside `torch.compile` tracing or a CUDA graph capture the model decides (timing is not possible there).

Forms are chosen once per key, so a run takes the same forms in every step and on resume (from the
disk cache); two machines may pick different forms, whose results agree to float rounding.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import torch

from ..atomic import write_json_atomic
from ..cache import cache_dir
from ..machine import device_name
from ..modes import Mode

log = logging.getLogger(__name__)

MODES = ("measure", "model")
ENV = "PERSONALIZE_FORMS"
REPEATS = 3  # timed runs per form after one warm-up; the fastest counts (other processes only slow a run down)


@dataclass(frozen=True)
class Form:
    """One exact way to compute the adapted layer's output from `x`."""

    run: Callable[[torch.Tensor], torch.Tensor]
    cost: float | None  # the multiply-add model's cost; None: offered only when measuring


FORM_CHOICE = Mode(ENV, MODES, "measure", "form choice")
form_mode = FORM_CHOICE.get
form_choice = FORM_CHOICE.using  # choose forms by a mode ("measure" or "model") inside a block
_choices: dict[str, str] = {}  # machine|key -> form name, this process
_files: dict[str, dict[str, str]] = {}  # machine -> the choices its cache file held when read


def by_model(forms: dict[str, Form]) -> str:
    """The form of least modelled cost (on a tie, the first listed)."""
    costed = {name: form.cost for name, form in forms.items() if form.cost is not None}
    return min(costed, key=costed.__getitem__)


def choose(key: str, forms: dict[str, Form], x: torch.Tensor, trainables: list[torch.Tensor], training: bool) -> str:
    """The form to run for `key` (see the module docstring); `trainables`: the adapter's tensors that
    training differentiates, `training`: whether this call is part of a training step."""
    if len(forms) == 1:
        return next(iter(forms))
    if form_mode() == "model" or torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return by_model(forms)
    machine = f"{device_name(x.device)} | torch {torch.__version__}"
    full_key = f"{machine}|{key}"
    name = _choices.get(full_key) or _read(machine).get(key)
    if name not in forms:
        timings = {form_name: time_form(form, x, trainables, training) for form_name, form in forms.items()}
        name = min(timings, key=timings.__getitem__)
        _write(machine, key, name)
        log.debug("form for %s: %s (%s)", key, name, ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in timings.items()))
    _choices[full_key] = name
    return name


def time_form(form: Form, x: torch.Tensor, trainables: list[torch.Tensor], training: bool) -> float:
    """Seconds of the fastest of `REPEATS` runs of `form` on `x` (forward, plus backward when training)."""
    x = x.detach().requires_grad_(training and x.requires_grad)
    inputs = [t for t in trainables if t.requires_grad] + ([x] if x.requires_grad else [])
    best = math.inf
    for repeat in range(1 + REPEATS):
        _synchronize(x.device)
        start = time.perf_counter()
        # Identity saved-tensor hooks: inside gradient checkpointing the timing runs must not register
        # tensors with the checkpoint (its recomputation, which finds the choice made, would not match).
        with torch.set_grad_enabled(training), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            y = form.run(x)
            if training and inputs and y.requires_grad:
                torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)  # no .grad is touched
        _synchronize(x.device)
        if repeat:
            best = min(best, time.perf_counter() - start)
    return best


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_file(machine: str) -> Path:
    return cache_dir("forms") / f"{sha256(machine.encode()).hexdigest()[:16]}.json"


def _read(machine: str) -> dict[str, str]:
    """The machine's stored choices (read once per process); an unreadable or foreign file counts as empty."""
    if machine not in _files:
        choices: dict[str, str] = {}
        path = cache_file(machine)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("machine") == machine and isinstance(data.get("choices"), dict):
                choices = {k: v for k, v in data["choices"].items() if isinstance(k, str) and isinstance(v, str)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring the unreadable form cache %s (%s); it will be rewritten", path, exc)
        _files[machine] = choices
    return _files[machine]


def _write(machine: str, key: str, name: str) -> None:
    choices = _read(machine)
    choices[key] = name
    try:
        write_json_atomic(cache_file(machine), {"machine": machine, "choices": choices})
    except OSError as exc:  # a read-only cache costs a measurement next run, nothing else
        log.debug("cannot write the form cache: %s", exc)


def forget() -> None:
    """Drop the choices held in memory (the disk cache is read again on the next call)."""
    _choices.clear()
    _files.clear()
