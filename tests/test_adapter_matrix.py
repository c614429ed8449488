"""The shared adapter matrix: every registered method (and each other target preset it offers) on
every tiny UNet family.

Unchanged at init, only adapter tensors change after an optimiser step, merged == live,
detach restores W0 bit-exactly, save/load round trip, parameter count formula, scale 0 == base.
"""

from __future__ import annotations

import pytest
import torch

import personalize as P
from personalize.models import tiny_unet
from tests.helpers import UNET_STYLES, run_unet, unet_inputs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def train_one_step(unet, adapter, inputs) -> None:
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.0)
    loss = run_unet(unet, inputs).pow(2).mean()
    loss.backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def base_outputs():
    cache = {}
    for style in UNET_STYLES:
        unet = tiny_unet(style)
        inputs = unet_inputs(unet)
        with torch.no_grad():
            cache[style] = (inputs, run_unet(unet, inputs))
    return cache


def configurations() -> list:
    """Every method at its defaults, then every method's non-default target presets (e.g. lora:attention_convs)."""
    defaults = [pytest.param(method, "", id=method) for method in P.METHODS]
    presets = [
        pytest.param(method, preset, id=f"{method}:{preset}")
        for method in P.METHODS
        for preset in P.get_method(method).presets
        if preset != P.get_method(method).default_preset
    ]
    return defaults + presets


@pytest.mark.parametrize("style", UNET_STYLES)
@pytest.mark.parametrize("method, preset", configurations())
def test_adapter_matrix(method, preset, style, base_outputs, tmp_path):
    unet = tiny_unet(style)
    inputs, base_out = base_outputs[style]
    original = {k: v.clone() for k, v in unet.state_dict().items()}

    adapter = P.attach(unet, method, preset=preset)
    with torch.no_grad():
        assert rel(run_unet(unet, inputs), base_out) < 1e-5, "output changed at init"

    assert adapter.num_trainable == adapter.expected_num_trainable(), "trainable count != formula"
    assert adapter.num_trainable > 0
    count = adapter.num_trainable

    before = {n: p.detach().clone() for n, p, _ in adapter.named_trainables()}
    train_one_step(unet, adapter, inputs)
    for key, value in unet.state_dict().items():
        if key in original:  # base weights untouched
            assert torch.equal(value, original[key]), f"base tensor {key} changed"
    changed = [n for n, p, _ in adapter.named_trainables() if not torch.equal(p, before[n])]
    assert changed, "no adapter tensor changed after an optimiser step"

    with torch.no_grad():
        live = run_unet(unet, inputs)
        assert rel(live, base_out) > 1e-7, "trained adapter has no effect"
        adapter.merge()
        merged = run_unet(unet, inputs)
        adapter.unmerge()
        assert rel(merged, live) < 1e-5, "merged output != live output"
        for key, value in unet.state_dict().items():
            if key in original:
                assert torch.equal(value, original[key]), f"unmerge did not restore {key}"

        adapter.scale = 0.0
        assert rel(run_unet(unet, inputs), base_out) < 1e-6, "scale 0 != base model"
        adapter.scale = 0.5
        half = run_unet(unet, inputs)
        adapter.scale = 1.0

    path = tmp_path / "adapter.safetensors"
    adapter.save(str(path))
    adapter.detach()
    state = unet.state_dict()
    assert state.keys() == original.keys()
    for key in original:
        assert torch.equal(state[key], original[key]), f"detach did not restore {key} bit-exactly"

    fresh = tiny_unet(style)
    loaded = P.load_adapter(fresh, str(path))
    with torch.no_grad():
        assert rel(run_unet(fresh, inputs), live) < 1e-5, "save/load round trip changed outputs"
        loaded.scale = 0.5
        assert rel(run_unet(fresh, inputs), half) < 1e-5, "scale does not behave the same after reload"
    assert loaded.num_trainable == loaded.expected_num_trainable() == count, "reloaded trainable count != formula"
