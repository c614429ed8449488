"""How ComfyUI and AUTOMATIC1111 read an exported file, written from their loading code (read, not copied).

ComfyUI (comfy/lora.py, comfy/utils.py, comfy/weight_adapter/lora.py, comfy/sd1_clip.py):
- `model_lora_keys_unet` names each UNet weight, from `unet_to_diffusers` (diffusers name <-> LDM
  name): `lora_unet_<LDM name>` and `lora_unet_<diffusers name>` (dots as `_`), and `unet.` (or no
  prefix) + the diffusers module path with `.to_` written `.processor.to_` and `to_out.0` as `to_out`.
- `model_lora_keys_clip` names the CLIP layers `mlp.fc1/fc2`, `self_attn.q/k/v/out_proj` of encoder
  layer b: `lora_te_` / `lora_te1_` + `text_model_encoder_layers_<b>_<layer>` and
  `text_encoder.text_model.encoder.layers.<b>.<layer>` for CLIP-L (and SD 2.x's OpenCLIP-H); SDXL's
  OpenCLIP-bigG next to CLIP-L: `lora_te2_...` and `text_encoder_2.text_model...`.
- `LoRAAdapter.load` reads, for each name x, the first factor pair present among `x.lora_up.weight` /
  `x.lora_down.weight`, `x_lora.up.weight` / `x_lora.down.weight`, `x.lora_B.weight` / `x.lora_A.weight`,
  `x.lora.up.weight` / `x.lora.down.weight`, `x.lora_linear_layer.up.weight` / `.down.weight`, and
  `x.alpha`; every other key of the file is logged as "lora key not loaded" and ignored.
  `calculate_weight` adds `strength * alpha / rank * up.flatten(1) @ down.flatten(1)` (reshaped to the
  weight), with alpha / rank = 1 where the file has no alpha.
- `load_embed`: the word after `embedding:` in a prompt is a file name in the embeddings folders, tried
  as it is and with `.safetensors`, `.pt`, `.bin`; a safetensors file gives its `clip_l` / `clip_g`
  tensor for that encoder, else its first tensor.

A1111 (modules/textual_inversion/textual_inversion.py `load_from_file`): a safetensors embedding is
named by its file name without the extension, and a prompt holding that name's tokens gets its vectors.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Diffusers ResnetBlock2D layer -> LDM ResBlock layer, as ComfyUI's UNET_MAP_RESNET relates them.
RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# The layers of a diffusers transformer block ComfyUI's TRANSFORMER_BLOCKS lists (weights of Linear layers).
TRANSFORMER = tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")) + ("ff.net.0.proj", "ff.net.2")
# Top-level layers (ComfyUI's UNET_MAP_BASIC).
BASIC = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
FACTOR_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)


def comfy_unet_layers(unet) -> dict[str, str]:
    """Diffusers layer name -> LDM layer name for the UNet's attention, resnet, sampler and top-level layers.

    ComfyUI numbers `input_blocks` 1 + (layers + 1) * block + resnet (the downsampler takes the last
    index of a block), `output_blocks` (layers + 1) * block + resnet of the up blocks, an upsampler
    joining the block's last output block after its resnet (and attention, when it has one)."""
    config = unet.config
    blocks = len(config.down_block_types)
    per = config.layers_per_block
    per = [per] * blocks if isinstance(per, int) else list(per)
    depth = config.transformer_layers_per_block
    depth = [depth] * blocks if isinstance(depth, int) else list(depth)  # transformer blocks per attention
    out: dict[str, str] = dict(BASIC)
    for x, kind in enumerate(config.down_block_types):
        first = 1 + (per[x] + 1) * x
        for i in range(per[x]):
            add_block(out, f"down_blocks.{x}", i, f"input_blocks.{first + i}", depth[x] if "CrossAttn" in kind else 0)
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{first + per[x]}.0.op"
    add_block(out, "mid_block", 0, "middle_block", depth[-1])  # resnet 0, attention: middle_block.0, .1
    for diffusers, ldm in RESNET.items():  # resnet 1: middle_block.2
        out[f"mid_block.resnets.1.{diffusers}"] = f"middle_block.2.{ldm}"
    for x, (kind, layers, transformers) in enumerate(zip(config.up_block_types, reversed(per), reversed(depth))):
        attention = "CrossAttn" in kind
        for i in range(layers + 1):
            add_block(out, f"up_blocks.{x}", i, f"output_blocks.{(layers + 1) * x + i}", transformers if attention else 0)
        out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{(layers + 1) * x + layers}.{2 if attention else 1}.conv"
    return out


def add_block(out: dict[str, str], block: str, i: int, ldm: str, transformers: int) -> None:
    """Resnet i of `block` as `ldm`.0 and, where it has `transformers` > 0, attention i as `ldm`.1."""
    for diffusers, layer in RESNET.items():
        out[f"{block}.resnets.{i}.{diffusers}"] = f"{ldm}.0.{layer}"
    if transformers:
        for projection in ("proj_in", "proj_out"):
            out[f"{block}.attentions.{i}.{projection}"] = f"{ldm}.1.{projection}"
        for t in range(transformers):
            for layer in TRANSFORMER:
                out[f"{block}.attentions.{i}.transformer_blocks.{t}.{layer}"] = f"{ldm}.1.transformer_blocks.{t}.{layer}"


def comfy_unet_key_map(unet) -> dict[str, str]:
    """ComfyUI's LoRA name (no suffix) -> the diffusers layer it patches, for the layers `unet` has."""
    present = {name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    keys = {}
    for name, ldm in comfy_unet_layers(unet).items():
        if name not in present:
            continue
        keys[f"lora_unet_{ldm.replace('.', '_')}"] = name
        keys[f"lora_unet_{name.replace('.', '_')}"] = name
        spelled = name.replace(".to_", ".processor.to_")
        spelled = spelled[:-2] if spelled.endswith(".to_out.0") else spelled
        keys[spelled] = keys[f"unet.{spelled}"] = name
    return keys


def comfy_clip_key_map(layer_counts: dict[str, int]) -> dict[str, str]:
    """ComfyUI's LoRA name -> `<part>.encoder.layers.<b>.<layer>` for text encoders with these layer counts."""
    keys = {}
    for part, count in layer_counts.items():
        for b in range(count):
            for layer in CLIP_LAYERS:
                label = f"{part}.encoder.layers.{b}.{layer}"
                kohya = f"text_model_encoder_layers_{b}_{layer.replace('.', '_')}"
                if part == "text_encoder":
                    keys[f"lora_te_{kohya}"] = keys[f"lora_te1_{kohya}"] = label
                else:
                    keys[f"lora_te2_{kohya}"] = label
                keys[f"{part}.text_model.encoder.layers.{b}.{layer}"] = label
    return keys


def comfy_load(tensors: dict[str, torch.Tensor], key_map: dict[str, str]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """What ComfyUI applies: {layer: weight change at strength 1 (float32, flattened to (out, fan_in))},
    and the file's keys it does not load."""
    patches, loaded = {}, set()
    for name, layer in key_map.items():
        alpha = f"{name}.alpha"
        for up_suffix, down_suffix in FACTOR_PAIRS:
            up, down = name + up_suffix, name + down_suffix
            if up in tensors:
                up_matrix, down_matrix = tensors[up].float().flatten(1), tensors[down].float().flatten(1)  # (out, r), (r, fan_in)
                scale = tensors[alpha].item() / down_matrix.shape[0] if alpha in tensors else 1.0
                patches[layer] = scale * (up_matrix @ down_matrix)
                loaded |= {up, down} | ({alpha} & set(tensors))
                break
    return patches, set(tensors) - loaded


def comfy_embedding(word: str, folder: Path, encoder_key: str) -> torch.Tensor | None:
    """The vectors ComfyUI puts in place of `word` (`embedding:<name>`) for the encoder whose file key is
    `encoder_key` (`clip_l`, `clip_g`), from embeddings folder `folder`; None: not an embedding."""
    from safetensors.torch import load_file

    prefix = "embedding:"
    if not word.startswith(prefix):
        return None
    name = word[len(prefix) :]
    candidates = [folder / name] + [folder / f"{name}{ext}" for ext in (".safetensors", ".pt", ".bin")]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        return None
    tensors = load_file(str(path))
    return tensors[encoder_key] if encoder_key in tensors else next(iter(tensors.values()))


def a1111_embedding_name(path: Path) -> str:
    """The prompt word A1111 gives a safetensors embedding file."""
    return path.stem
