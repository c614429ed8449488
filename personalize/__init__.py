"""Personalise Stable Diffusion from a few photos with parameter-efficient adapters.

import personalize as P
pipe = P.load_pipeline("tiny")
ad = P.attach(pipe.unet, "svfit")
ad.save("concept.safetensors")
"""

from .adapters import get_method, method_names
from .errors import UserError
from .export import export_adapter, export_lora
from .inject import Adapter, attach, load_adapter, save_adapter
from .io import adapter_info
from .models import load_pipeline, load_unet

METHODS: tuple[str, ...] = method_names()

__all__ = [
    "METHODS",
    "Adapter",
    "UserError",
    "adapter_info",
    "attach",
    "export_adapter",
    "export_lora",
    "get_method",
    "load_adapter",
    "load_pipeline",
    "load_unet",
    "save_adapter",
]
