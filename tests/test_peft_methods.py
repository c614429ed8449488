"""peft baselines (dora, loha, lokr, oft) beyond the shared matrix: option errors, the count formulas
against peft's own layers at SD-sized shapes and on convs, the interpolated strength of the
non-additive methods, and the slot's remove/install cycle that the benchmark uses.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import personalize as P
from personalize.adapters.peft_methods import oft_block_size


def one_layer(layer: nn.Module, method: str, **options) -> tuple[nn.Sequential, P.Adapter]:
    root = nn.Sequential(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns when it adjusts an OFT block size
        return root, P.attach(root, method, targets="^0$", **options)


def perturb(adapter: P.Adapter, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param, _ in adapter.named_trainables():
            size = param.abs().mean().item() or 1.0
            param.add_(0.1 * size * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("dora", {"rank": 0}, "dora rank must be a positive integer, got 0"),
        ("loha", {"alpha": 0.0}, "loha alpha must be a positive number, got 0.0"),
        ("lokr", {"decompose_factor": 0}, "lokr decompose_factor must be -1 .* or a positive integer, got 0"),
        ("oft", {"block_size": 1}, "oft block_size must be an integer >= 2"),
        ("oft", {"rank": 4}, "unknown option\\(s\\) rank for method 'oft'"),
    ],
)
def test_option_errors(method, options, message):
    with pytest.raises(P.UserError, match=message):
        one_layer(nn.Linear(32, 32), method, **options)


@pytest.mark.parametrize(
    "method, options",
    [
        ("dora", {}),
        ("loha", {}),
        ("lokr", {}),
        ("lokr", {"decompose_both": True, "rank": 2}),
        ("lokr", {"decompose_factor": 4, "rank": 16}),
        ("oft", {}),
        ("oft", {"block_size": 5}),
    ],
)
@pytest.mark.parametrize("out, fan_in", [(320, 320), (640, 768), (1280, 2048), (48, 36)])
def test_count_formula_matches_peft_on_linears(method, options, out, fan_in):
    _, adapter = one_layer(nn.Linear(fan_in, out), method, **options)
    assert adapter.num_trainable == adapter.expected_num_trainable()


@pytest.mark.parametrize("method", ["dora", "loha", "lokr"])
def test_convs_count_and_merge(method):
    root, adapter = one_layer(nn.Conv2d(32, 64, 3, padding=1), method)
    assert adapter.num_trainable == adapter.expected_num_trainable()
    perturb(adapter)
    x = torch.randn(2, 32, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        live = root(x)
        adapter.merge()
        merged = root(x)
        adapter.unmerge()
    assert torch.allclose(merged, live, atol=1e-5)


def test_oft_block_size_follows_peft():
    assert oft_block_size(64, 32) == 32
    assert oft_block_size(48, 32) == 24  # nearest divisor, the smaller on a tie
    assert oft_block_size(40, 7) == 8
    assert oft_block_size(16, 32) == 16


def test_oft_refuses_convs():
    with pytest.raises(P.UserError, match="matches no Linear layer"):
        one_layer(nn.Conv2d(32, 32, 1), "oft")


@pytest.mark.parametrize("method", ["dora", "oft"])
def test_non_additive_strength_interpolates(method):
    root, adapter = one_layer(nn.Linear(32, 16), method)
    perturb(adapter)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = root[0].base_layer(x)
        full, full_delta = root(x), adapter.deltas()["0"]
        adapter.scale = 0.25
        quarter, quarter_delta = root(x), adapter.deltas()["0"]
        adapter.scale = 0.0
        zero = root(x)
    assert not torch.allclose(full, base, atol=1e-3)
    assert torch.allclose(quarter, base + 0.25 * (full - base), atol=1e-6)
    assert torch.allclose(quarter_delta, 0.25 * full_delta, atol=1e-7)
    assert torch.equal(zero, base)


def test_remove_and_install_keep_the_tensors():
    root, adapter = one_layer(nn.Linear(32, 32), "dora")
    perturb(adapter)
    x = torch.randn(3, 32)
    with torch.no_grad():
        live = root(x)
        for slot in adapter.slots.values():
            slot.remove()
        assert isinstance(root[0], nn.Linear) and not torch.allclose(root(x), live)
        for slot in adapter.slots.values():
            slot.install()
        assert torch.equal(root(x), live)
    adapter.detach()
    assert isinstance(root[0], nn.Linear)
