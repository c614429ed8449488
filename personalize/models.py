"""Load a base model: a hub id, a local diffusers folder, a single checkpoint file, or a built-in one.

Built-in models (offline, deterministic: the same weights in every process):
- `shapes`: a complete 32 px pipeline pretrained by this project on the procedural shapes world
  (`personalize/shapes/`), shipped inside the package: where behaviour is judged offline.
- `tiny`: a complete Stable Diffusion pipeline with random weights, small enough to run every flow
  on a CPU in seconds, with the real CLIP BPE tokenizer built from the vocabulary open_clip ships.
  `tiny_pipeline("sd2" | "sdxl")` builds its SD 2.x (v-prediction, 48-wide text encoder) and SDXL
  (two text encoders, the second with a projection) siblings, for tests.
- `sd15-random`: the SD 1.5 UNet architecture (859.5M parameters, random weights) for benchmarks,
  in a pipeline with small random text encoder and VAE.
"""

from __future__ import annotations

import gzip
import json
import logging
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base_models import BUILTIN_MODELS, DEFAULT_BASE_MODEL
from .errors import UserError

log = logging.getLogger(__name__)

BUILTIN_SEED = 0  # fixed seed: built-in weights are identical in every process

# Denoising steps of class images and validation samples (DPM-Solver++, training/prior.py): 20-25 converge on a
# trained model (Lu et al. 2022), and `shapes` was measured at 25 (BENCHMARKS.md). The random-weight built-ins draw
# noise at any count: 3 steps run every update of the 2nd-order solver (first order, second order, first-order last
# step), so one validation on `tiny` costs about as many UNet passes as 15 of its training steps, where 25 cost 130.
SAMPLE_STEPS = 25
BUILTIN_SAMPLE_STEPS = {"shapes": SAMPLE_STEPS, "tiny": 3, "sd15-random": 3}


def sample_steps_for(base_model: str) -> int:
    """The default sampling steps of class images and validation samples on `base_model`."""
    return BUILTIN_SAMPLE_STEPS.get(base_model, SAMPLE_STEPS)


# SD 1.5's scheduler settings (PNDM as shipped in the hub repository's scheduler_config.json).
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)

# Tiny UNets in the three families the adapters must support (used by `tiny` and the tests).
TINY_UNETS: dict[str, dict[str, Any]] = {
    "sd1": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # SD 2.x: linear proj_in/proj_out, 1024-like wider cross-attention, per-block head dims.
    "sd2": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=32,
    ),
    # SDXL: text_time additional embeddings, several transformer layers per block, no attention at top.
    "sdxl": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 32 pooled text dims + 6 time ids * 8
        norm_num_groups=32,
    ),
}


def default_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


DEVICE_FORMS = "cpu, cuda, cuda:N or mps"  # the device kinds this project runs on


def available_devices() -> list[str]:
    """The devices this machine can run on, by name: cpu, each CUDA GPU, mps."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device named by `device` (None: `default_device()`). The one check of a user's --device:
    an unknown name, a kind this project does not run on, or a device this machine lacks is a one-line
    UserError naming the value and the devices available here."""
    if device is None:
        return default_device()
    here = f"available here: {', '.join(available_devices())}"
    try:
        parsed = device if isinstance(device, torch.device) else torch.device(str(device).strip().lower())
    except RuntimeError as exc:
        raise UserError(f"unknown device '{device}'; accepted: {DEVICE_FORMS} ({here})") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}': cuda requested but no CUDA GPU is available ({here})")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"device '{device}': this machine has no CUDA GPU {parsed.index} ({here})")
    if parsed.type == "mps" and not _mps_available():
        raise UserError(f"device '{device}': mps requested but Apple MPS is not available ({here})")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device '{device}' is not supported; accepted: {DEVICE_FORMS} ({here})")
    return parsed


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs (bf16 would also fit; fp16 is what SD checkpoints ship), fp32 on CPU."""
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def _seeded(build, seed: int = BUILTIN_SEED):
    """Run `build` under a fixed seed without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_unet(style: str = "sd1"):
    from diffusers import UNet2DConditionModel

    if style not in TINY_UNETS:
        raise UserError(f"unknown tiny UNet style '{style}'; accepted: {', '.join(TINY_UNETS)}")
    unet = _seeded(lambda: UNet2DConditionModel(**TINY_UNETS[style]))
    unet.register_to_config(_name_or_path=f"tiny-{style}" if style != "sd1" else "tiny")
    return unet


def sd15_random_unet():
    from diffusers import UNet2DConditionModel

    unet = _seeded(lambda: UNet2DConditionModel(**SD15_UNET))
    unet.register_to_config(_name_or_path="sd15-random")
    return unet


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> tuple[str, str]:
    """vocab.json and merges.txt of the CLIP BPE tokenizer, built from open_clip's packaged vocabulary."""
    import open_clip

    source = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(source).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    vocab = list(byte_chars) + [c + "</w>" for c in byte_chars]
    vocab += ["".join(merge.split()) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="personalize-clip-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, others to code points >= 256."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [chars[b] for b in order]


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = clip_tokenizer_files()
    # Positional: transformers 4 names them vocab_file/merges_file, transformers 5 vocab/merges.
    return CLIPTokenizer(vocab, merges, model_max_length=77)


def _random_text_encoder(hidden: int, layers: int, heads: int, projection: bool = False):
    """A random CLIP text encoder; `projection`: with the pooled-output projection (SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    if projection:  # another seed: SDXL's two tiny encoders must not share their weights
        return _seeded(lambda: CLIPTextModelWithProjection(config), BUILTIN_SEED + 1)
    return _seeded(lambda: CLIPTextModel(config))


def _random_vae(blocks: int):
    from diffusers import AutoencoderKL

    channels = (32, 64, 64, 64)[:blocks]
    return _seeded(
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=channels,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=256,
        )
    )


def _builtin_pipeline(name: str):
    if name == "shapes":
        from .shapes.model import shapes_pipeline

        return shapes_pipeline()
    if name == "tiny":
        pipe = tiny_pipeline("sd1")
    else:
        pipe = _sd_pipeline(sd15_random_unet(), _random_text_encoder(768, 1, 12), _random_vae(4))
    pipe.register_to_config(_name_or_path=name)
    return pipe


def _sd_pipeline(unet, text_encoder, vae, scheduler=None):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler or PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_pipeline(style: str = "sd1"):
    """A complete pipeline around `tiny_unet(style)` with random weights: `sd1` is the built-in `tiny`;
    `sd2` has a 48-wide text encoder and v-prediction; `sdxl` two 32-wide text encoders (the second
    with a projection: 32 pooled dims, as `TINY_UNETS["sdxl"]` expects) and SDXL's pipeline."""
    unet, vae = tiny_unet(style), _random_vae(2)  # tiny_unet refuses an unknown style
    schedule = {k: v for k, v in SD15_SCHEDULER.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    # imports per style: Euler (it imports scipy) and the SDXL pipeline module take seconds that the built-in `tiny` skips
    if style == "sd1":
        pipe = _sd_pipeline(unet, _random_text_encoder(32, 2, 4), vae)
    elif style == "sd2":
        from diffusers import EulerDiscreteScheduler

        scheduler = EulerDiscreteScheduler(**schedule, prediction_type="v_prediction")
        pipe = _sd_pipeline(unet, _random_text_encoder(48, 2, 4), vae, scheduler)
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=_random_text_encoder(32, 2, 4),
            text_encoder_2=_random_text_encoder(32, 2, 4, projection=True),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=EulerDiscreteScheduler(**schedule),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_external(base_model: str, dtype: torch.dtype, config: str | None):
    from diffusers import DiffusionPipeline  # the pipeline classes load when used: the SDXL module alone takes seconds

    path = Path(base_model).expanduser()
    if path.suffix in (".safetensors", ".ckpt"):
        if not path.is_file():
            raise UserError(f"checkpoint file '{base_model}' does not exist")
        if _is_sdxl_checkpoint(path):
            from diffusers import StableDiffusionXLPipeline as pipeline_cls

            kwargs = {"torch_dtype": dtype}
        else:
            from diffusers import StableDiffusionPipeline as pipeline_cls

            kwargs = {"torch_dtype": dtype, "safety_checker": None}
        if config:
            kwargs["config"] = config
        return _explain_failures(base_model, lambda: pipeline_cls.from_single_file(str(path), **kwargs), is_file=True)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"'{base_model}' is not a diffusers pipeline folder (no model_index.json); "
                "accepted: a hub id, a diffusers folder, a .safetensors/.ckpt file, or one of: " + ", ".join(BUILTIN_MODELS)
            )
        return _explain_failures(base_model, lambda: DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, safety_checker=None))
    if base_model.count("/") != 1 or base_model.startswith(("/", ".", "~")):
        raise UserError(
            f"base model '{base_model}' is neither an existing path nor a hub id (owner/name); "
            "accepted: a hub id, a diffusers folder, a .safetensors/.ckpt file, or one of: " + ", ".join(BUILTIN_MODELS)
        )
    return _explain_failures(base_model, lambda: DiffusionPipeline.from_pretrained(base_model, torch_dtype=dtype, safety_checker=None))


def _is_sdxl_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith("conditioner.embedders.1") for key in handle.keys())


def _explain_failures(base_model: str, load, is_file: bool = False):
    try:
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype; torch_dtype still works on every version we support
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            return load()
    except UserError:
        raise
    except Exception as exc:  # hub, network and format errors all end here with one clear message
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "check that it is a Stable Diffusion checkpoint; offline, pass config=<local diffusers folder>"
            if is_file
            else "check the id and your network, or use a local diffusers folder, a .safetensors file, or 'tiny' for an offline demo"
        )
        raise UserError(f"could not load base model '{base_model}': {reason} ({hint})") from exc


def load_pipeline(
    base_model: str = DEFAULT_BASE_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | None = None,
):
    """A diffusers pipeline for `base_model`, on `device` (default: CUDA, MPS, CPU) in `dtype`
    (default: fp16 on GPU, fp32 on CPU). `config` helps single-file checkpoints load offline."""
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if base_model in BUILTIN_MODELS:
        pipe = _builtin_pipeline(base_model).to(device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        pipe = _load_external(base_model, dtype, config).to(device)
    pipe.unet.register_to_config(_name_or_path=base_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_unet(base_model: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Only the UNet of `base_model` (the benchmark needs no text encoder or VAE)."""
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if base_model == "sd15-random":
        unet = sd15_random_unet()
    elif base_model == "tiny":
        unet = tiny_unet("sd1")
    elif base_model == "shapes":
        from .shapes.model import shapes_unet

        unet = shapes_unet()
    else:
        return load_pipeline(base_model, device, dtype).unet
    unet.to(device)
    return unet.to(dtype=dtype) if dtype != torch.float32 else unet
