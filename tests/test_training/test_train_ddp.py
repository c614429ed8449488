"""Multi-process training (DDP over gloo on 2 CPU processes, as `accelerate launch` does on GPUs): one
run, one set of files, a checkpoint holding each process's random state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import personalize as P


def test_two_processes(photos, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "personalize.cli",
        "train",
        "--cpu",
        "--base-model",
        "tiny",
        "--instance-images",
        str(photos),
        "--output-dir",
        str(out),
        "--method",
        "svfit",
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--prior",
        "none",
        "--validation-every",
        "0",
        "--checkpoint-every",
        "2",
        "--eval-timesteps",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 3/3 steps") == 1  # only the main process reports

    result = json.loads((out / "result.json").read_text())
    assert result["num_processes"] == 2 and result["steps_done"] == 3
    for step in ("step_000002", "step_000003"):
        assert {"rng_0.pt", "rng_1.pt"} <= {p.name for p in (out / "checkpoints" / step).iterdir()}
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3]  # one log, written once
    assert P.adapter_info(out / "adapter.safetensors")["metadata"]["steps"] == 3
