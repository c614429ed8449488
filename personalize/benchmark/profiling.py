"""Where a training step's time goes (`personalize bench --profile DIR`), per method:

- a torch.profiler table of operators by self time, grouped by input shapes (which say which layers);
- a per-layer replay: each adapted layer's forward + backward, run alone on the input shape it gets in
  the UNet, with the adapter live and switched off (the frozen layer), so the table shows what the
  method adds over the frozen model layer by layer. Replays take the median of a few runs and also
  report CPU time, so they stay readable on a machine shared with other jobs.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_text_atomic
from ..inject import Adapter
from .workload import Workload

ROWS = 30  # operators listed per table
REPLAYS = 5  # timed replays per layer and variant (after one untimed)


def operator_table(step, device: torch.device) -> str:
    """Run `step()` once under torch.profiler; operators by self time, grouped by input shapes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
    averages = prof.key_averages(group_by_input_shape=True)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return averages.table(sort_by=sort, row_limit=ROWS, max_name_column_width=40, max_shapes_column_width=90)


def layer_table(adapter: Adapter, work: Workload) -> str:
    """Per-layer replay of the adapted layers, grouped by (type, weight shape, input shape)."""
    modules = {name: adapter.root.get_submodule(name) for name in adapter.slots}  # what the UNet calls
    shapes: dict[str, torch.Size] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, args[0].shape)

        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in modules.items()]
    try:
        work.inference_step()
    finally:
        for hook in hooks:
            hook.remove()
    groups: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])  # count, frozen/adapted wall, cpu
    dtype = work.inputs["sample"].dtype
    for name, module in modules.items():
        slot = adapter.slots[name]
        x = torch.randn(shapes[name], device=work.device, dtype=dtype, requires_grad=True)
        with work.autocast():
            grad = torch.randn_like(module(x))

        def step(module=module, x=x, grad=grad) -> None:  # bound now: timed inside this iteration
            with work.autocast():
                y = module(x)
            y.backward(grad)

        adapted = _median_timing(work, step)
        slot.set_live(False)
        try:
            frozen = _median_timing(work, step)
        finally:
            slot.set_live(True)
        weight = slot.base.weight
        key = (type(slot.base).__name__, tuple(weight.shape), tuple(shapes[name]))
        row = groups[key]
        row[0] += 1
        row[1] += frozen[0]
        row[2] += adapted[0]
        row[3] += frozen[1]
        row[4] += adapted[1]
    return _format_layers(groups)


def _median_timing(work: Workload, step) -> tuple[float, float]:
    step()
    runs = [work.timed(step) for _ in range(REPLAYS)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _format_layers(groups: dict[tuple, list[float]]) -> str:
    total = [sum(row[i] for row in groups.values()) for i in range(1, 5)]
    lines = [
        "forward + backward of each adapted layer alone, on its input shape in the UNet (ms; CPU = process CPU time)",
        f"all adapted layers: frozen {total[0] * 1e3:.1f}, adapted {total[1] * 1e3:.1f}, "
        f"added {(total[1] - total[0]) * 1e3:.1f} (CPU: frozen {total[2] * 1e3:.1f}, added {(total[3] - total[2]) * 1e3:.1f})",
        "",
        f"{'count':>5}  {'layer':<8} {'weight':<22} {'input':<22} {'frozen':>8} {'adapted':>8} {'added, all':>11} {'CPU added':>10}",
    ]
    rows = sorted(groups.items(), key=lambda item: -(item[1][2] - item[1][1]))
    for (kind, weight, shape), (count, frozen, adapted, frozen_cpu, adapted_cpu) in rows:
        lines.append(
            f"{int(count):>5}  {kind:<8} {'x'.join(map(str, weight)):<22} {'x'.join(map(str, shape)):<22} "
            f"{frozen / count * 1e3:>8.2f} {adapted / count * 1e3:>8.2f} {(adapted - frozen) * 1e3:>11.1f} "
            f"{(adapted_cpu - frozen_cpu) * 1e3:>10.1f}"
        )
    return "\n".join(lines)


def write_profile(folder: str | Path, label: str, operators: str, layers: str | None) -> Path:
    path = Path(folder) / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label)}.txt"
    text = f"training step of '{label}'\n\n"
    if layers is not None:
        text += f"== adapted layers ==\n{layers}\n\n"
    text += f"== operators by self time ==\n{operators}\n"
    write_text_atomic(path, text)
    return path
