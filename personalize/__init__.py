"""Personalise Stable Diffusion from a few photos with parameter-efficient adapters.

import personalize as P
pipe = P.load_pipeline("tiny")
ad = P.attach(pipe.unet, "svfit")
ad.save("concept.safetensors")

Text encoders and learned tokens too (one file, several parts):
ad = P.PipelineAdapter(pipe, {"unet": P.attach(pipe.unet, "svfit"), **P.attach_text_encoders(pipe, "lora")},
                       P.new_tokens(pipe, {"<sks>": "dog"}))
ad.save("concept.safetensors"); P.load_adapter(pipe, "concept.safetensors")
"""

from .adapters import get_method, method_names
from .errors import UserError
from .export import export_adapter, export_lora
from .inject import Adapter, attach, save_adapter
from .io import adapter_info
from .models import load_pipeline, load_unet
from .parts import attach_text_encoder, attach_text_encoders
from .pipeline_adapter import PipelineAdapter, load_adapter
from .tokens import Tokens, insert_tokens, new_tokens

METHODS: tuple[str, ...] = method_names()

__all__ = [
    "METHODS",
    "Adapter",
    "PipelineAdapter",
    "Tokens",
    "UserError",
    "adapter_info",
    "attach",
    "attach_text_encoder",
    "attach_text_encoders",
    "export_adapter",
    "export_lora",
    "get_method",
    "insert_tokens",
    "load_adapter",
    "load_pipeline",
    "load_unet",
    "new_tokens",
    "save_adapter",
]
