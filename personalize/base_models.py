"""The base models a user names, without torch (the CLI's help and the app's form read these;
`models.py` loads them): the default hub id and the built-in models with what a user sees of each."""

from __future__ import annotations

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUILTIN_MODELS = ("shapes", "tiny", "sd15-random")
# What a user sees of each built-in model (the app's banner names the one it runs).
BUILTIN_DESCRIPTIONS = {
    "shapes": "pretrained by this project on a procedural world of coloured shapes, 32x32 images; "
    "a demo concept trains on a CPU in about a minute: try it in the Train tab",
    "tiny": "random weights, 64x64 images: every flow works, the pictures are noise",
    "sd15-random": "the SD 1.5 UNet with random weights, for speed benchmarks: the pictures are noise",
}
