"""Resumable checkpoints: adapter, optimiser, lr schedule, grad scaler, RNG states and step.

Layout: `checkpoints/step_000100/` holding adapter.safetensors (the live training weights, which
resume loads), optimizer.pt, scheduler.pt, scaler.pt (fp16 only), rng_<rank>.pt (one per process),
with ema_decay > 0 ema.safetensors (the EMA shadows, float32, keyed by tensor name; metadata
`updates` = the update count) and adapter_ema.safetensors (an adapter file holding the EMA weights,
for `load_adapter`), and state.json (written last). A checkpoint
is assembled in a hidden temporary folder and renamed into place, so a crash never leaves a
half-written one; only the last K are kept.

Resume reads every file of the latest checkpoint before anything is restored (`usable_checkpoint`);
a damaged or missing file is named in one line and the checkpoint before it is used instead.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_json_atomic
from ..errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "state.json"
EMA_FILE = "ema.safetensors"  # the EMA state: shadows and update count
EMA_ADAPTER_FILE = "adapter_ema.safetensors"  # the EMA weights as an adapter file
RNG_RE = re.compile(r"^rng_(\d+)\.pt$")
RNG_KEYS = ("generator", "torch", "python", "numpy")
STATE_NUMBERS = ("train_time", "eval_loss_start")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their state.json exists), oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def staging_dir(folder: Path, step: int) -> Path:
    return folder / f".{checkpoint_name(step)}.tmp"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step can touch: ours, torch (CPU and CUDA), Python and NumPy."""
    state: dict[str, Any] = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, keys.tolist(), int(pos), int(has_gauss), float(cached)  # plain types: loadable with weights_only


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rng(staging: Path, rank: int, generator: torch.Generator) -> None:
    torch.save(rng_state(generator), staging / f"rng_{rank}.pt")


def read_rng(saved: Saved, rank: int, generator: torch.Generator) -> bool:
    """Restore this process's random states; False if the checkpoint has none for `rank`."""
    if rank not in saved.rng:
        return False
    restore_rng_state(saved.rng[rank], generator)
    return True


def finish_checkpoint(
    staging: Path,
    folder: Path,
    step: int,
    adapter,
    adapter_metadata: dict[str, Any],
    optimizer,
    scheduler,
    scaler,
    state: dict[str, Any],
    keep: int,
    ema=None,
) -> Path:
    """Main process: write the shared files into `staging`, rename it into place, prune old checkpoints."""
    adapter.save(staging / "adapter.safetensors", metadata=adapter_metadata)
    if ema is not None:
        write_ema(staging, ema)
        with ema.applied():
            adapter.save(staging / EMA_ADAPTER_FILE, metadata=adapter_metadata)
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), staging / "scaler.pt")
    write_json_atomic(staging / STATE_FILE, {**state, "step": step})
    final = folder / checkpoint_name(step)
    if final.exists():  # re-saving a step after a resume: replace the old copy
        old = folder / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)
    for _, path in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


class DamagedFile(UserError):
    """A checkpoint file that is missing or cannot be read; the message names it."""


@dataclass
class Saved:
    """A checkpoint read in full (`read_checkpoint`): everything but the adapter weights, which
    `text_side.load_for_training` attaches from `path / "adapter.safetensors"` (checked here)."""

    path: Path
    state: dict[str, Any]  # state.json: step, train_time, eval_loss_start, ...
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[int, dict[str, Any]]  # rank -> `rng_state`
    ema: dict[str, Any] | None  # `AdapterEMA.state_dict` (ema_decay > 0)

    @property
    def step(self) -> int:
        return self.state["step"]


def usable_checkpoint(folder: Path, ema: bool) -> Saved | None:
    """The latest checkpoint in `folder` whose files all read; a damaged one is named (warning) and the one
    before it tried. None without checkpoints; a UserError naming the damaged file when none reads."""
    first_damage = None
    for _, path in reversed(list_checkpoints(folder)):
        try:
            saved = read_checkpoint(path, ema)
        except DamagedFile as exc:
            log.warning("%s; trying the checkpoint before it", exc)
            first_damage = first_damage or exc
            continue
        if first_damage is not None:
            log.warning("resuming from %s, the latest checkpoint whose files all read", path)
        return saved
    if first_damage is not None:
        raise UserError(f"{first_damage}, and no earlier checkpoint reads in full; start again with overwrite (--overwrite)")
    return None


def read_checkpoint(path: Path, ema: bool) -> Saved:
    """Read and check every file of the checkpoint at `path` (`ema`: it must hold the EMA state); DamagedFile names the first bad one."""
    from safetensors.torch import load_file

    _read(path / "adapter.safetensors", load_file)
    state = _read(path / STATE_FILE, lambda p: json.loads(p.read_text(encoding="utf-8")))
    step_ok = isinstance(state, dict) and isinstance(state.get("step"), int) and not isinstance(state["step"], bool)
    if not step_ok or not all(isinstance(state.get(k), (int, float)) for k in STATE_NUMBERS):
        raise DamagedFile(f"checkpoint file '{path / STATE_FILE}' is damaged (it lacks step, {', '.join(STATE_NUMBERS)})")
    rng = {}
    for file in sorted(path.iterdir()):
        if match := RNG_RE.match(file.name):
            states = _read(file, _torch_load)
            if not isinstance(states, dict) or not all(k in states for k in RNG_KEYS):
                raise DamagedFile(f"checkpoint file '{file}' is damaged (it lacks the random states {', '.join(RNG_KEYS)})")
            rng[int(match.group(1))] = states
    return Saved(
        path=path,
        state=state,
        optimizer=_read(path / "optimizer.pt", _torch_load),
        scheduler=_read(path / "scheduler.pt", _torch_load),
        scaler=_read(path / "scaler.pt", _torch_load) if (path / "scaler.pt").is_file() else None,
        rng=rng,
        ema=_read_ema(path) if ema else None,
    )


def _torch_load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the safe unpickler's notes on foreign pickle protocols: the file is refused or read
        return torch.load(path, weights_only=True, map_location="cpu")


def _read(path: Path, reader) -> Any:
    """`reader(path)`, or DamagedFile naming `path` and why in a few words."""
    if not path.is_file():
        raise DamagedFile(f"checkpoint file '{path}' is missing")
    try:
        return reader(path)
    except Exception as exc:  # torch, safetensors and json each raise their own kinds
        raise DamagedFile(f"checkpoint file '{path}' is damaged ({_reason(exc)})") from exc


def _reason(exc: Exception) -> str:
    """Why a file did not read, in a few words (torch's refusal of a pickle with code in it advises loading
    it unsafely: that advice is not passed on)."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        return "it holds objects other than tensors and plain values; refused unread, as loading it could run code"
    if isinstance(exc, (KeyError, EOFError)) or not text:  # torch's unpickler on a cut or foreign file
        return f"truncated, or not in its format: {type(exc).__name__}"
    first = text.splitlines()[0].split(". ")[0]
    return first if len(first) <= 200 else first[:200] + "..."


def load_training_state(saved: Saved, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore optimiser, schedule and grad scaler from a checkpoint read by `read_checkpoint`; returns state.json."""
    for name, target, state in (("optimizer.pt", optimizer, saved.optimizer), ("scheduler.pt", scheduler, saved.scheduler)):
        _restore(saved.path / name, target, state)
    if scaler is not None and saved.scaler is not None:
        _restore(saved.path / "scaler.pt", scaler, saved.scaler)
    return saved.state


def _restore(path: Path, target, state: dict[str, Any]) -> None:
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        message = f"checkpoint file '{path}' does not fit this run ({_reason(exc)}); start again with overwrite (--overwrite)"
        raise UserError(message) from exc


def write_ema(staging: Path, ema) -> None:
    """The EMA state (`ema.AdapterEMA.state_dict`) as safetensors: shadows, and the update count as metadata."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {name: t.detach().cpu().contiguous() for name, t in state["shadow"].items()}
    save_file(tensors, staging / EMA_FILE, metadata={"updates": str(state["updates"])})


def _read_ema(checkpoint: Path) -> dict[str, Any]:
    """The EMA state written by `write_ema` (`AdapterEMA.state_dict`); DamagedFile when missing or unreadable."""
    from safetensors import safe_open

    path = checkpoint / EMA_FILE
    if not path.is_file():
        raise DamagedFile(f"checkpoint {checkpoint} has no {EMA_FILE} to resume the EMA (ema_decay) from")

    def read(file: Path) -> tuple[dict[str, torch.Tensor], str | None]:
        with safe_open(str(file), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {}).get("updates")

    shadow, updates = _read(path, read)
    if updates is None or not updates.isdigit():
        raise DamagedFile(f"checkpoint file '{path}' is damaged (no valid update count: metadata 'updates' is {updates!r})")
    return {"shadow": shadow, "updates": int(updates)}
