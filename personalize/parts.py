"""The parts of a pipeline an adapter attaches to (the UNet, the text encoders) and the text-encoder targets.

A part is a pipeline component by its diffusers name (`io.PARTS`): `unet`, `text_encoder` (SD 1.x /
2.x: the only one; SDXL: CLIP ViT-L) and `text_encoder_2` (SDXL: OpenCLIP ViT-bigG). `part_model`
is the module each part's layer names are taken from: the UNet itself, and for a text encoder the
CLIP transformer (`text_root`), so that its layers are `encoder.layers.<i>.self_attn.q_proj` whether
transformers nests the model in `text_model` (4.x) or not (5.x): a file saved under one loads under
the other.

A CLIP text encoder is a stack of pre-norm transformer layers on token states x (tokens, width):

    x = x + out_proj(attention(q_proj(ln1(x)), k_proj(ln1(x)), v_proj(ln1(x))))   # each (width, width)
    x = x + fc2(act(fc1(ln2(x))))                                                  # fc1 (4w, w), fc2 (w, 4w)

Every layer adapted there is an nn.Linear: a method must adapt Linear layers (filter atoms adapt
only k x k convs and are refused; `atoms` puts its Kronecker half on these linears). The target
choice (`TEXT_LAYERS`) lives here only; a method's own presets name UNet layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .adapters import get_method
from .adapters.base import Method
from .adapters.declarations import join_patterns
from .errors import UserError
from .inject import Adapter, attach
from .io import PARTS, TEXT_PARTS

TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # the tokenizer feeding each text part

TEXT_ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
TEXT_MLP = r"mlp\.(fc1|fc2)$"
TEXT_LAYERS = {
    # diffusers' DreamBooth LoRA scripts (train_dreambooth_lora*.py): target_modules q_proj, k_proj, v_proj, out_proj.
    "attention": TEXT_ATTENTION,
    # kohya sd-scripts (networks/lora.py, TEXT_ENCODER_TARGET_REPLACE_MODULE): every Linear of CLIPAttention and CLIPMLP.
    "attention_mlp": join_patterns(TEXT_ATTENTION, TEXT_MLP),
}
DEFAULT_TEXT_LAYERS = "attention"  # as diffusers' scripts: the attention projections only


def is_pipeline(model: Any) -> bool:
    """A diffusers pipeline (a holder of components), not a single nn.Module."""
    return not isinstance(model, nn.Module) and isinstance(getattr(model, "unet", None), nn.Module)


def text_root(text_encoder: nn.Module) -> nn.Module:
    """The CLIP transformer inside a text encoder: `text_model` in transformers 4, the model itself in 5."""
    return getattr(text_encoder, "text_model", text_encoder)


def part_model(pipe: Any, part: str) -> nn.Module:
    """The module part `part` of `pipe` attaches to (layer names are relative to it)."""
    if part not in PARTS:
        raise UserError(f"unknown part '{part}'; accepted: {', '.join(PARTS)}")
    model = getattr(pipe, part, None)
    if not isinstance(model, nn.Module):
        have = ", ".join(pipeline_parts(pipe)) or "none"
        raise UserError(f"this pipeline has no {part} (it has: {have}); the adapter was made for another model family")
    return model if part == "unet" else text_root(model)


def pipeline_parts(pipe: Any) -> list[str]:
    """The parts `pipe` has, in `PARTS` order (SDXL: all three; SD 1.x/2.x: unet and text_encoder)."""
    return [part for part in PARTS if isinstance(getattr(pipe, part, None), nn.Module)]


def text_parts(pipe: Any) -> list[str]:
    return [part for part in pipeline_parts(pipe) if part in TEXT_PARTS]


def text_targets(layers: str) -> str:
    """The regular expression (over `text_root` module names) of the text-encoder layer set `layers`."""
    if layers not in TEXT_LAYERS:
        raise UserError(f"unknown text-encoder layers '{layers}'; accepted: {', '.join(TEXT_LAYERS)}")
    return TEXT_LAYERS[layers]


def check_text_method(method: type[Method]) -> None:
    """UserError unless `method` adapts Linear layers, the only kind a CLIP text encoder has."""
    if not any(issubclass(nn.Linear, kind) for kind in method.layer_types):
        kinds = "/".join(kind.__name__ for kind in method.layer_types)
        raise UserError(
            f"method '{method.name}' adapts only {kinds} layers ({method.description}); a text encoder has only Linear layers: "
            f"choose another method for it"
        )


def attach_text_encoder(text_encoder: nn.Module, method: str, *, layers: str = DEFAULT_TEXT_LAYERS, **options: Any) -> Adapter:
    """Attach `method` (a name from METHODS) with its `options` to one CLIP text encoder's `layers`
    (`TEXT_LAYERS`; an explicit `targets=<regex>` over `text_root` names replaces them). The whole
    text encoder is frozen; only the adapter's tensors train."""
    check_text_method(get_method(method))
    root = text_root(text_encoder)
    adapter = attach(root, method, **{"targets": text_targets(layers), **options})  # freezes `root`
    inside = {id(param) for param in root.parameters()}
    for param in text_encoder.parameters():  # transformers 4 keeps SDXL's text projection outside `text_model`
        if id(param) not in inside:
            param.requires_grad_(False)
    return adapter


def attach_text_encoders(
    pipe: Any, method: str, *, parts: Sequence[str] | None = None, layers: str = DEFAULT_TEXT_LAYERS, **options: Any
) -> dict[str, Adapter]:
    """`attach_text_encoder` on each text encoder of `pipe` named in `parts` (default: every one it
    has; SDXL: `text_encoder` and `text_encoder_2`), with the same method and options. Transactional:
    if one fails, the others attached are detached."""
    chosen = text_parts(pipe) if parts is None else list(parts)
    for part in chosen:
        if part not in TEXT_PARTS:
            raise UserError(f"'{part}' is not a text encoder part; accepted: {', '.join(TEXT_PARTS)}")
        part_model(pipe, part)  # the pipeline has it, or a UserError
    if not chosen:
        raise UserError("this pipeline has no text encoder to attach an adapter to")
    attached: dict[str, Adapter] = {}
    try:
        for part in chosen:
            attached[part] = attach_text_encoder(getattr(pipe, part), method, layers=layers, **options)
    except BaseException:
        for adapter in attached.values():
            adapter.detach()
        raise
    return attached
