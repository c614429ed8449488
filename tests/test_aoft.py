"""AOFT (reconstructed): the generator is a rotation for unit q, AO is its first d columns, the update
is exactly zero at init, the count formula, option errors, and one training step moves q, lam and
the output. The shared matrix (test_adapter_matrix.py) covers merge/save/load on every UNet family.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import personalize as P
from personalize.adapters.aoft import EPS, ao, generator_matrix
from personalize.models import tiny_unet
from tests.helpers import run_unet, unet_inputs


def unit_vector(n: int, seed: int, first_sign: float) -> torch.Tensor:
    q = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q[0] = first_sign * q[0].abs()
    return q / q.norm()


@pytest.mark.parametrize("first_sign", [1.0, -1.0])
@pytest.mark.parametrize("n", [2, 9, 64])
def test_generator_is_the_rotation_taking_e0_to_q(n, first_sign):
    q = unit_vector(n, seed=n, first_sign=first_sign)
    rotation = generator_matrix(q)  # (n, n)
    identity = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(rotation.T @ rotation, identity, atol=1e-12)
    assert torch.linalg.det(rotation).item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(rotation @ identity[:, 0], q, atol=1e-15)
    assert torch.equal(rotation[0, 1:], -q[1:])  # first row (q_0, -q_1, ..., -q_{n-1})
    assert torch.allclose(rotation[1:, 1:], identity[1:, 1:] - torch.outer(q[1:], q[1:]) / (1 + q[0]), atol=1e-15)


@pytest.mark.parametrize("d", [1, 3, 16])
def test_ao_is_the_first_d_columns(d):
    q = torch.randn(16, generator=torch.Generator().manual_seed(d), dtype=torch.float64)  # not normalised
    q[0] = 1.0 + q[0].abs()
    assert torch.allclose(ao(q, d), generator_matrix(q)[:, :d], atol=1e-15)


def test_denominator_is_guarded_and_keeps_its_sign():
    q = torch.tensor([-1.0, 0.5, 0.25], dtype=torch.float64)  # 1 + q_0 == 0
    assert torch.isfinite(ao(q, 3)).all()
    assert ao(q, 3)[1, 1].item() == pytest.approx(1.0 - 0.25 / EPS)
    q[0] = -1.0 - 1e-4  # 1 + q_0 slightly negative: clamped to -EPS
    assert ao(q, 3)[1, 1].item() == pytest.approx(1.0 + 0.25 / EPS)


def test_delta_is_exactly_zero_at_init_and_count_formula():
    unet = tiny_unet("sd2")
    adapter = P.attach(unet, "aoft", d=4)
    for name, delta in adapter.deltas().items():
        assert not delta.any(), f"delta of {name} is not exactly zero at init"
    for slot in adapter.slots.values():
        out, fan_in = slot.base.weight.shape
        assert sum(p.numel() for _, p, _ in slot.named_trainables()) == out + fan_in + 4
    assert adapter.num_trainable == adapter.expected_num_trainable()


def test_conv_target_uses_fan_in():
    layer = nn.Conv2d(6, 5, 3)
    root = nn.Sequential(layer)
    adapter = P.attach(root, "aoft", targets="^0$", d=2)
    assert adapter.num_trainable == 5 + 6 * 9 + 2 == adapter.expected_num_trainable()
    assert adapter.deltas()["0"].shape == layer.weight.shape


@pytest.mark.parametrize(
    "options, message",
    [
        ({"d": 0}, "option 'd' of method 'aoft' must be a positive integer, got 0"),
        ({"d": 33}, "option 'd' of method 'aoft' is 33, above min(out, in) = 32"),
        ({"d": "eight"}, "option 'd' of method 'aoft'"),
    ],
)
def test_option_errors(options, message):
    with pytest.raises(P.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        P.attach(tiny_unet("sd1"), "aoft", **options)


def test_training_step_moves_q_lam_and_the_output():
    torch.manual_seed(0)
    unet = tiny_unet("sd1")
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base = run_unet(unet, inputs)
    adapter = P.attach(unet, "aoft")
    before = {n: p.detach().clone() for n, p, _ in adapter.named_trainables()}
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # step 1 moves lam (q gets no gradient while lam == 0); step 2 moves q too
        run_unet(unet, inputs).pow(2).mean().backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    moved = {n.rpartition(".")[2] for n, p, _ in adapter.named_trainables() if not torch.equal(p, before[n])}
    assert moved == {"q_up", "q_down", "lam"}
    with torch.no_grad():
        assert not torch.allclose(run_unet(unet, inputs), base)
