"""What an export to a standard LoRA file can be asked for, without torch (the CLI's help and the app's
form read these; `export.py` does the work): file layouts, factor dtypes and the defaults."""

from __future__ import annotations

FORMATS = ("diffusers", "kohya")
DTYPES = ("float16", "bfloat16", "float32")  # names of torch dtypes
DEFAULT_FORMAT = "kohya"  # the one layout A1111, ComfyUI and diffusers all load
DEFAULT_DTYPE = "float16"  # what LoRA files ship as; float32 only to check exactness
DEFAULT_ENERGY = 0.99  # by default, for updates without a rank bound: keep 99% of the squared norm (error <= 10%)
# Which tools load each layout, as the CLI, its report and the app's export panel say it.
READERS = {
    "kohya": "diffusers (pipe.load_lora_weights), A1111 (models/Lora, <lora:NAME:1> in the prompt) and ComfyUI (models/loras, Load LoRA)",
    "diffusers": "diffusers (pipe.load_lora_weights) and ComfyUI (models/loras, Load LoRA); not A1111, which needs --format kohya",
}
