"""Pretrain the built-in `shapes` model from scratch: `python -m personalize.shapes.pretrain`.

Three stages, each resumable from its own checkpoint in `--work-dir` (rerun the same command):
1. the dataset: `--images` pretraining scenes rendered once (seed `--seed`), cached as .npy;
2. the VAE: reconstruction (MSE) plus a small KL term, then the latent scaling factor 1/std;
3. the UNet and the text encoder jointly on the DreamBooth/SD objective (epsilon prediction, SD 1.5
   noise schedule, min-SNR-5 weights, 10% empty captions for classifier-free guidance), with an EMA
   of both; the EMA weights are what ships. The text encoder is frozen from then on.
The result goes to `personalize/shapes/data/` (or `--out`): `shapes.safetensors` (fp16) and
`shapes.json` (configs, settings, measured times). Seeds are fixed; a resumed run continues with
the same batches as an uninterrupted one (batch content depends on the step only).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_path, write_json_atomic
from . import model as M
from . import world as W


@dataclass
class PretrainConfig:
    work_dir: str = "outputs/shapes-pretrain"  # checkpoints and the rendered dataset
    out: str = str(M.DATA_DIR)  # where shapes.safetensors / shapes.json are written
    seed: int = 0
    images: int = 24000  # distinct pretraining scenes (captions are re-drawn every step)
    vae_steps: int = 700
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4  # small: the latents stay close to a Gaussian without blurring stripes
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 8e-4
    warmup: int = 100
    ema_decay: float = 0.998
    empty_caption: float = 0.1  # caption dropout for classifier-free guidance
    min_snr_gamma: float = 5.0  # Hang et al. 2023: faster convergence than the plain MSE
    checkpoint_every: int = 100
    threads: int = 0  # torch threads on CPU; 0 = torch's default
    device: str = ""  # "" = CUDA when present, else CPU


def batch_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """The generator of one step's batch: a function of the step only, so resume reproduces."""
    return np.random.default_rng([seed, {"vae": 1, "unet": 2}[stage], step])


def dataset(config: PretrainConfig) -> tuple[np.ndarray, list[W.Scene]]:
    """(images (n, 32, 32, 3) uint8, scenes), rendered once and cached in the work dir."""
    scenes = W.pretraining_set(config.images, config.seed)
    cache = Path(config.work_dir) / f"images-{config.seed}-{config.images}.npy"
    if cache.is_file():
        return np.load(cache), scenes
    images = np.stack([np.asarray(W.render(s)) for s in tqdm(scenes, desc="render dataset", unit="img", mininterval=10)])
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, images)
    return images, scenes


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def train_vae(config: PretrainConfig, vae, images: np.ndarray, device: torch.device) -> float:
    """Stage 2; returns the seconds spent in this process."""
    path = Path(config.work_dir) / "vae.pt"
    opt = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    state = load_checkpoint(path)
    start, spent = 0, 0.0
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, spent = state["step"], state["seconds"]
    if start >= config.vae_steps:
        return spent
    vae.train()
    began = time.perf_counter() - spent
    bar = tqdm(range(start, config.vae_steps), initial=start, total=config.vae_steps, desc="vae", unit="step", mininterval=10)
    for step in bar:
        rng = batch_rng(config.seed, "vae", step)
        torch.manual_seed(config.seed * 100003 + step)
        x = to_tensor(images[rng.integers(len(images), size=config.vae_batch)], device)  # (b, 3, 32, 32)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps:
            save_checkpoint(
                path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "seconds": time.perf_counter() - began}
            )
    return time.perf_counter() - began


@torch.no_grad()
def encode_dataset(vae, images: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and stds of every image: (n, 4, 16, 16) each."""
    vae.eval()
    means, stds = [], []
    for i in tqdm(range(0, len(images), 256), desc="encode latents", unit="batch"):
        posterior = vae.encode(to_tensor(images[i : i + 256], device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup:
        return config.unet_lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.unet_steps - config.warmup)
    return config.unet_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_diffusion(config, unet, text_encoder, latents, scenes, scaling: float, device) -> tuple[dict, float]:
    """Stage 3; returns (EMA state dicts of unet and text_encoder, seconds spent)."""
    from diffusers import DDPMScheduler

    from ..models import clip_tokenizer

    tokenizer = clip_tokenizer()
    noise_scheduler = DDPMScheduler(**{k: v for k, v in M.SCHEDULER_CONFIG.items() if k != "steps_offset"})
    alphas = noise_scheduler.alphas_cumprod.to(device)  # (1000,)
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    ema = {
        "unet": {k: v.detach().clone() for k, v in unet.state_dict().items()},
        "text_encoder": {k: v.detach().clone() for k, v in text_encoder.state_dict().items()},
    }
    path = Path(config.work_dir) / "diffusion.pt"
    state = load_checkpoint(path)
    start, spent = 0, 0.0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema, start, spent = state["ema"], state["step"], state["seconds"]
    mean, std = latents
    unet.train()
    text_encoder.train()
    began = time.perf_counter() - spent
    bar = tqdm(range(start, config.unet_steps), initial=start, total=config.unet_steps, desc="unet+text", unit="step", mininterval=10)
    for step in bar:
        rng = batch_rng(config.seed, "unet", step)
        torch.manual_seed(config.seed * 100003 + step)
        idx = rng.integers(len(scenes), size=config.unet_batch)
        captions = ["" if rng.random() < config.empty_caption else W.caption(scenes[i], rng) for i in idx]
        ids = torch.as_tensor(idx)
        z = (mean[ids] + std[ids] * torch.randn_like(std[ids])).to(device) * scaling  # (b, 4, 16, 16)
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), device=device)
        noisy = noise_scheduler.add_noise(z, noise, t)
        states = text_encoder(tokenize(tokenizer, captions, device))[0]  # (b, 77, 64)
        pred = unet(noisy, t, states).sample
        weight = torch.clamp(snr[t], max=config.min_snr_gamma) / snr[t]  # min-SNR for epsilon prediction
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in (("unet", unet), ("text_encoder", text_encoder)):
                for key, value in module.state_dict().items():
                    if value.dtype.is_floating_point:
                        ema[name][key].mul_(decay).add_(value.detach(), alpha=1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.unet_steps:
            save_checkpoint(
                path,
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "opt": opt.state_dict(),
                    "ema": ema,
                    "step": step + 1,
                    "seconds": time.perf_counter() - began,
                },
            )
    return ema, time.perf_counter() - began


def export(config: PretrainConfig, parts: dict, scaling: float, seconds: dict[str, float]) -> None:
    from safetensors.torch import save_file

    out = Path(config.out)
    tensors = {
        f"{name}.{k}": v.detach().to("cpu", torch.float16).contiguous()
        for name, module in parts.items()
        for k, v in module.state_dict().items()
    }
    with atomic_path(out / "shapes.safetensors") as tmp:
        save_file(tensors, str(tmp))
    record = {
        "vae_scaling_factor": scaling,
        "resolution": W.RESOLUTION,
        "unet": M.UNET_CONFIG,
        "vae": M.VAE_CONFIG,
        "text_encoder": M.TEXT_CONFIG,
        "scheduler": M.SCHEDULER_CONFIG,
        "parameters": {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()},
        "pretraining": asdict(config) | {"out": "personalize/shapes/data", "work_dir": "(local)"},
        "seconds": seconds,
        "device": str(next(parts["unet"].parameters()).device),
        "threads": torch.get_num_threads(),
    }
    write_json_atomic(out / "shapes.json", record)


def pretrain(config: PretrainConfig) -> None:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.threads:
        torch.set_num_threads(config.threads)
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    parts = {name: module.to(device) for name, module in M.build_components().items()}
    t0 = time.perf_counter()
    images, scenes = dataset(config)
    render_seconds = time.perf_counter() - t0
    vae_seconds = train_vae(config, parts["vae"], images, device)
    parts["vae"].requires_grad_(False)
    t0 = time.perf_counter()
    cache = Path(config.work_dir) / f"latents-{config.vae_steps}.pt"  # a resumed run skips re-encoding
    if cache.is_file():
        mean, std = torch.load(cache)
    else:
        mean, std = encode_dataset(parts["vae"], images, device)
        save_checkpoint(cache, (mean, std))
    scaling = float(1.0 / mean.std())
    encode_seconds = time.perf_counter() - t0
    ema, unet_seconds = train_diffusion(config, parts["unet"], parts["text_encoder"], (mean, std), scenes, scaling, device)
    parts["unet"].load_state_dict(ema["unet"])
    parts["text_encoder"].load_state_dict(ema["text_encoder"])
    seconds = {"render": render_seconds, "vae": vae_seconds, "encode": encode_seconds, "unet_text": unet_seconds}
    seconds["total"] = sum(seconds.values())
    export(config, parts, scaling, seconds)
    print(f"shapes model written to {config.out} ({seconds['total'] / 60:.1f} min of training)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m personalize.shapes.pretrain", description=__doc__.splitlines()[0])
    for name, value in asdict(PretrainConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    pretrain(PretrainConfig(**vars(args)))


if __name__ == "__main__":
    main()
