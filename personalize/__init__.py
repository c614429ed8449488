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

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it; each is imported on first use, so `import personalize`
# (and the CLI's parser) loads no torch.
_HOMES = {
    "Adapter": "inject",
    "PipelineAdapter": "pipeline_adapter",
    "Tokens": "tokens",
    "UserError": "errors",
    "adapter_info": "io",
    "attach": "inject",
    "attach_text_encoder": "parts",
    "attach_text_encoders": "parts",
    "export_adapter": "export",
    "export_lora": "export",
    "get_method": "adapters",
    "insert_tokens": "tokens",
    "load_adapter": "pipeline_adapter",
    "load_pipeline": "models",
    "load_unet": "models",
    "method_names": "adapters",
    "new_tokens": "tokens",
    "save_adapter": "inject",
}


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # every registered method's name (imports the method modules)
        value: Any = importlib.import_module(f"{__name__}.adapters").method_names()
    elif name in _HOMES:
        value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES) | {"METHODS"})


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
