"""What an export to a standard LoRA file can be asked for, without torch (the CLI's help and the app's
form read these; `export.py` does the work): file layouts, factor dtypes and the defaults."""

from __future__ import annotations

FORMATS = ("diffusers", "kohya")
DTYPES = ("float16", "bfloat16", "float32")  # names of torch dtypes
DEFAULT_FORMAT = "kohya"  # the one layout A1111, ComfyUI and diffusers all load
DEFAULT_DTYPE = "float16"  # what LoRA files ship as; float32 only to check exactness
DEFAULT_ENERGY = 0.99  # keep 99% of each update's squared norm: relative error <= 10% per layer
