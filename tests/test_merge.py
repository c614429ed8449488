"""One merge (personalize/inject.py): `add_deltas` / `merged_deltas` put `W0 + sum_i scale_i * delta_i`
in place and give the very W0 tensors back; `Adapter.merge` goes through it, and a merge that would
make a weight non-finite is refused with the weights untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import personalize as P
from personalize.inject import add_deltas, merged_deltas, restore_weights


def net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).to(dtype)


def test_merged_deltas_sums_scaled_updates_and_restores_w0():
    root = net()
    w0 = {name: root.get_submodule(name).weight for name in ("0", "2")}
    first = {"0": torch.randn(5, 6), "2": torch.randn(4, 5)}
    second = {"0": torch.randn(5, 6)}
    with merged_deltas(root, [(first, 0.5), (second, -2.0), (second, 0.0)]):
        torch.testing.assert_close(root[0].weight, w0["0"] + 0.5 * first["0"] - 2.0 * second["0"], rtol=0, atol=1e-6)
        torch.testing.assert_close(root[2].weight, w0["2"] + 0.5 * first["2"], rtol=0, atol=1e-6)
        assert not root[0].weight.requires_grad
    assert root[0].weight is w0["0"] and root[2].weight is w0["2"]  # the same tensors: bit-exact


def test_merge_that_overflows_is_refused_and_changes_nothing():
    root = net(torch.float16)
    w0 = [root[0].weight, root[2].weight]
    with pytest.raises(P.UserError, match=r"layer '2' non-finite in torch.float16.*scale is too large"):
        add_deltas(root, [({"0": torch.full((5, 6), 1e-3), "2": torch.ones(4, 5)}, 1e6)])  # layer 0 merges first
    assert root[0].weight is w0[0] and root[2].weight is w0[1]


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_non_finite_scale_is_refused_by_the_merge(scale):
    root = net()
    with pytest.raises(P.UserError, match="finite number"):
        add_deltas(root, [({"0": torch.zeros(5, 6)}, scale)])


def test_adapter_merge_goes_through_add_deltas(monkeypatch):
    import personalize.inject as inject

    root = net()
    adapter = P.attach(root, "svfit", targets=r"^(0|2)$")
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(0.1)
    adapter.scale = 0.5
    x = torch.randn(3, 6)
    live = root(x)
    calls = []
    monkeypatch.setattr(inject, "add_deltas", lambda *args: calls.append(args) or add_deltas(*args))
    w0 = root[0].weight
    adapter.merge()
    assert len(calls) == 1 and root[0].weight is not w0
    torch.testing.assert_close(root(x), live, rtol=1e-5, atol=1e-6)
    adapter.unmerge()
    assert root[0].weight is w0
    restore_weights(root, {})  # nothing set aside: nothing changes
    assert root[0].weight is w0
