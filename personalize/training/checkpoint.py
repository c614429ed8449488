"""Resumable checkpoints: adapter, optimiser, lr schedule, grad scaler, RNG states and step.

Layout: `checkpoints/step_000100/` holding adapter.safetensors (the live training weights, which
resume loads), optimizer.pt, scheduler.pt, scaler.pt (fp16 only), rng_<rank>.pt (one per process),
with ema_decay > 0 ema.safetensors (the EMA shadows, float32, keyed by tensor name; metadata
`updates` = the update count) and adapter_ema.safetensors (an adapter file holding the EMA weights,
for `load_adapter`), and state.json (written last). A checkpoint
is assembled in a hidden temporary folder and renamed into place, so a crash never leaves a
half-written one; only the last K are kept.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
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


def read_rng(checkpoint: Path, rank: int, generator: torch.Generator) -> bool:
    """Restore this process's random states; False if the checkpoint has none for `rank`."""
    path = checkpoint / f"rng_{rank}.pt"
    if not path.is_file():
        return False
    restore_rng_state(torch.load(path, weights_only=True), generator)
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


def load_training_state(checkpoint: Path, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore optimiser, schedule and grad scaler; returns state.json."""
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    if scaler is not None and (checkpoint / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=True))
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def write_ema(staging: Path, ema) -> None:
    """The EMA state (`ema.AdapterEMA.state_dict`) as safetensors: shadows, and the update count as metadata."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {name: t.detach().cpu().contiguous() for name, t in state["shadow"].items()}
    save_file(tensors, staging / EMA_FILE, metadata={"updates": str(state["updates"])})


def read_ema(checkpoint: Path, ema) -> None:
    """Restore the EMA state written by `write_ema`; a checkpoint without one is refused."""
    from safetensors import safe_open

    path = checkpoint / EMA_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {checkpoint} has no {EMA_FILE} to resume the EMA (ema_decay) from; start again with overwrite")
    with safe_open(str(path), framework="pt") as f:
        shadow = {name: f.get_tensor(name) for name in f.keys()}
        updates = (f.metadata() or {}).get("updates")
    if updates is None or not updates.isdigit():
        raise UserError(f"{path} has no valid update count (metadata 'updates': {updates!r}); start again with overwrite")
    ema.load_state_dict({"shadow": shadow, "updates": int(updates)})
