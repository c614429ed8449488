"""Train the shapes judge: `python -m personalize.shapes.train_judge` (minutes on a CPU).

The training set is the whole world (every shape, colour, pattern and background, the concepts
included), rendered once from a fixed seed; each batch is augmented with a random blur (sigma up
to 1 px), Gaussian noise, brightness/contrast jitter and horizontal flips, so that the judge reads
the softer, noisier images a 32 px diffusion model draws. Accuracy per attribute on a fresh
rendered test set (another seed, clean and blurred) is printed and stored in the file's metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..atomic import atomic_path
from . import judge as J
from . import world as W


def world_set(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(images (n, 3, 32, 32) in [-1, 1], labels per attribute (n,)) over the whole world."""
    rng = np.random.default_rng(seed)
    scenes = [W.random_scene(rng, shapes=W.ALL_SHAPES, patterns=W.ALL_PATTERNS) for _ in range(n)]
    images = np.stack([np.asarray(W.render(s)) for s in tqdm(scenes, desc=f"render {n}", unit="img", mininterval=10)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in J.ATTRIBUTES.items()}
    return x, labels


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise, brightness/contrast jitter and flips; x (n, 3, 32, 32) in [-1, 1]."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=generator) * 1.0  # (n,) px
    taps = torch.arange(-2, 3).float()
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # (n, 5)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    padded = nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    rows = sum(kernel[:, i, None, None, None] * padded[:, :, :, i : i + 32] for i in range(5))  # (n, 3, 36, 32)
    x = sum(kernel[:, i, None, None, None] * rows[:, :, i : i + 32, :] for i in range(5))  # (n, 3, 32, 32)
    contrast = 1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    brightness = 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    x = x * contrast + brightness + 0.06 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.clamp(-1, 1)


@torch.no_grad()
def accuracy(judge: J.ShapesJudge, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    judge.eval()
    logits = {name: [] for name in labels}
    for start in range(0, len(x), 512):
        for name, value in judge(x[start : start + 512])[1].items():
            logits[name].append(value)
    return {name: float((torch.cat(v).argmax(1) == labels[name]).float().mean()) for name, v in logits.items()}


def train(steps: int, batch: int, images: int, seed: int, out: Path) -> dict:
    torch.manual_seed(seed)
    x, labels = world_set(images, seed)
    test_x, test_labels = world_set(2000, seed + 1)
    judge = J.ShapesJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    bar = tqdm(range(steps), desc="judge", unit="step", mininterval=10)
    for _ in bar:
        judge.train()
        idx = torch.randint(len(x), (batch,), generator=generator)
        _, logits = judge(augment(x[idx], generator))
        loss = sum(nn.functional.cross_entropy(logits[name], labels[name][idx]) for name in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - began
    clean = accuracy(judge, test_x, test_labels)
    blurred = accuracy(judge, augment(test_x, torch.Generator().manual_seed(seed + 2)), test_labels)
    record = {
        "steps": steps,
        "batch": batch,
        "images": images,
        "seed": seed,
        "seconds": round(seconds, 1),
        "accuracy_clean": clean,
        "accuracy_augmented": blurred,
    }
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in judge.state_dict().items() if v.dtype.is_floating_point}
    state.update({k: v for k, v in judge.state_dict().items() if not v.dtype.is_floating_point})
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"vocab": json.dumps(judge.vocab), "training": json.dumps(record)})
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m personalize.shapes.train_judge", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=J.WEIGHTS)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = train(args.steps, args.batch, args.images, args.seed, args.out)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
