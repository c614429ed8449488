"""Damaged adapter files and non-finite numbers (issue 13): every problem is one UserError naming the
file and the bad layer or key, and a failed load leaves the model exactly as it was (state dict,
forwards, submodules, requires_grad), through `load_adapter` and through `generate`."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import personalize as P
from personalize.adapters.slots import ADAPTER_ATTR
from personalize.generate import AdapterSpec, generate
from personalize.models import load_pipeline, tiny_unet

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # a target of every attention preset


def saved(tmp_path: Path, method: str, seed: int = 0, **options) -> Path:
    """An adapter of `method` on the sd1 tiny UNet with non-zero trained tensors, saved to a file."""
    adapter = P.attach(tiny_unet("sd1"), method, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    path = tmp_path / f"{method}.safetensors"
    adapter.save(path, metadata={"token": "sks", "class_noun": "dog"})
    return path


def damage(path: Path, tensors=None, header=None) -> Path:
    """Rewrite `path` with its tensors and header changed by the given functions (valid safetensors)."""
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    flat = load_file(str(path))
    if tensors is not None:
        flat = tensors(flat)
    if header is not None:
        meta = header(meta)
    damaged = path.with_name("damaged.safetensors")
    save_file(flat, str(damaged), metadata=meta)
    return damaged


def snapshot(root: torch.nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in root.state_dict().items()},
        "grad": [p.requires_grad for p in root.parameters()],
        "modules": [name for name, _ in root.named_modules()],
    }


def assert_untouched(root: torch.nn.Module, before: dict, frozen_ok: bool = False) -> None:
    """`root` as in `before`; `frozen_ok`: a successful load froze its parameters (attach does)."""
    after = snapshot(root)
    assert after["modules"] == before["modules"]  # no leftover adapter submodule or peft wrapper
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["grad"] == before["grad"] or (frozen_ok and not any(after["grad"]))
    for name, module in root.named_modules():
        assert "forward" not in vars(module), name  # the class's forward again
        assert not hasattr(module, ADAPTER_ATTR) and not hasattr(module, "base_layer"), name


def without(key: str):
    return lambda flat: {k: v for k, v in flat.items() if k != key}


def replaced(key: str, value):
    return lambda flat: {**flat, key: value(flat[key])}


DAMAGES = {
    # method, tensor change, header change, message
    "missing tensor": ("lora", without(f"{LAYER}.lora_A"), None, rf"layer '{LAYER}' has no tensor 'lora_A'"),
    "unknown tensor": (
        "svfit",
        lambda f: {**f, f"{LAYER}.extra": torch.zeros(2)},
        None,
        rf"layer '{LAYER}' has unknown tensor 'extra'.*expects ds",
    ),
    "tensor of no listed layer": (
        "svfit",
        lambda f: {**f, "mid_block.nothing.ds": torch.zeros(2)},
        None,
        r"tensor 'mid_block.nothing.ds' of no layer listed",
    ),
    "wrong shape": (
        "svfit",
        replaced(f"{LAYER}.ds", lambda t: torch.zeros(t.numel() + 1)),
        None,
        rf"tensor 'ds' of layer '{LAYER}' has shape \(\d+,\); expected \(\d+,\)",
    ),
    "wrong dtype": (
        "loldu",
        replaced(f"{LAYER}.z", lambda t: t.to(torch.int64)),
        None,
        rf"tensor 'z' of layer '{LAYER}' has dtype torch.int64; expected torch.float32",
    ),
    "NaN tensor": (
        "svfit",
        replaced(f"{LAYER}.ds", lambda t: torch.full_like(t, math.nan)),
        None,
        rf"tensor 'ds' of layer '{LAYER}' holds NaN",
    ),
    "missing layers entry": ("svfit", None, lambda h: {k: v for k, v in h.items() if k != "layers"}, r"no 'layers' entry in its header"),
    "bad config JSON": ("svfit", None, lambda h: {**h, "config": "{rank: 4"}, r"header entry 'config' is not valid JSON"),
    "bad metadata JSON": ("svfit", None, lambda h: {**h, "metadata": "[1, 2"}, r"header entry 'metadata' is not valid JSON"),
    "unknown method": ("svfit", None, lambda h: {**h, "method": "dora2"}, r"unknown method 'dora2'; accepted"),
    "bad option": ("svfit", None, lambda h: {**h, "config": '{"rnak": 4}'}, r"unknown option.*rnak"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_file_is_one_user_error_and_leaves_the_model_untouched(tmp_path, case):
    method, tensors, header, message = DAMAGES[case]
    path = damage(saved(tmp_path, method), tensors, header)
    unet = tiny_unet("sd1")
    before = snapshot(unet)
    with pytest.raises(P.UserError, match=message) as error:
        P.load_adapter(unet, path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert_untouched(unet, before)
    P.load_adapter(unet, saved(tmp_path, method))  # the model still takes a good adapter


def test_loaded_adapter_is_the_saved_one(tmp_path):
    path = saved(tmp_path, "lora")
    unet = tiny_unet("sd1")
    adapter = P.load_adapter(unet, path)
    stored = load_file(str(path))
    for name, slot in adapter.slots.items():
        for tensor, value in slot.saved_tensors().items():
            assert torch.equal(value, stored[f"{name}.{tensor}"])
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in adapter.parameters())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "2"])
def test_non_finite_scale_is_refused(value):
    adapter = P.attach(tiny_unet("sd1"), "svfit")
    with pytest.raises(P.UserError, match="adapter scale must be a finite number"):
        adapter.scale = value
    assert adapter.scale == 1.0


def test_generate_with_a_damaged_adapter_leaves_the_unet_untouched(tmp_path):
    pipe = load_pipeline("tiny", device="cpu")
    path = damage(saved(tmp_path, "lora"), without(f"{LAYER}.lora_B"))
    before = snapshot(pipe.unet)
    with pytest.raises(P.UserError, match=rf"{path}.*layer '{LAYER}' has no tensor 'lora_B'"):
        generate(pipe, "a photo of a dog", adapters=[AdapterSpec(str(path))], steps=2)
    assert_untouched(pipe.unet, before)


def test_generate_stops_when_the_render_turns_non_finite(tmp_path):
    pipe = load_pipeline("tiny", device="cpu")
    path = saved(tmp_path, "svfit")
    before = snapshot(pipe.unet)
    out = tmp_path / "out"
    with pytest.raises(P.UserError, match=r"NaN or infinite.*adapter strengths are the likely cause.*at 1e\+30"):
        generate(pipe, "a photo of a dog", adapters=[AdapterSpec(str(path), 1e30)], steps=2, output_dir=out)
    assert not list(out.glob("*.png"))  # no black images written
    assert_untouched(pipe.unet, before, frozen_ok=True)


def test_export_refuses_a_nan_adapter(tmp_path):
    adapter = P.attach(tiny_unet("sd1"), "svfit")
    with torch.no_grad():
        adapter.slots[LAYER].adapter.ds.fill_(math.nan)
    with pytest.raises(P.UserError, match=rf"layer '{LAYER}' holds NaN"):
        P.export_adapter(adapter, output=tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()


def test_file_format_module_knows_no_model():
    """io reads and writes files only; attaching them to a model is inject's (no import cycle)."""
    source = Path(P.__file__).with_name("io.py").read_text(encoding="utf-8")
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "inject" not in imported and "torch.nn" not in {m for m in imported if m}
    assert "torch.nn" not in {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
