"""Filter-subspace adapters (filter_atoms, kron_atoms, atoms): the math against the paper's formulas.

The shared matrix (test_adapter_matrix.py) covers init, training step, merge, save/load and counts;
these tests check what is specific to the atoms: the basis-free identity for complete atoms,
exact Kronecker reconstruction, the overcomplete and tune-coefficients variants against explicit
recompositions, the c1/c2/c3 configurations and the errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import personalize as P
from personalize.adapters import filter_atoms as filter_module
from personalize.adapters import kron_atoms as kron_module
from personalize.adapters.filter_atoms import FilterAtomsLayer, right_singular_basis
from personalize.adapters.forms import by_model
from personalize.adapters.kron_atoms import KronAtomsLayer, rearrange
from personalize.models import tiny_unet
from tests.helpers import run_unet, unet_inputs


class Net(nn.Module):
    """One 3x3 conv, one 1x1 conv and one linear, with random weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(6, 8, 3, padding=1)
            self.proj = nn.Conv2d(8, 8, 1)
            self.linear = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.conv(x))  # (b, 8, h, w)
        tokens = h.flatten(2).transpose(1, 2)  # (b, h*w, 8)
        return self.linear(torch.cat([tokens, tokens], dim=-1))  # (b, h*w, 12)


def randomise(adapter, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param, _ in adapter.named_trainables():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def flat(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.weight.shape[0] * layer.weight.shape[1], -1)  # (out*in, k*k)


def test_complete_atoms_update_is_basis_free():
    net = Net()
    adapter = P.attach(net, "filter_atoms", targets=r"^conv$", m=9)
    layer: FilterAtomsLayer = adapter.slots["conv"].adapter
    basis = layer.basis  # (9, 9)
    torch.testing.assert_close(basis.T @ basis, torch.eye(9), atol=1e-5, rtol=0)
    randomise(adapter)
    with torch.no_grad():
        expected = flat(net.conv) @ (basis @ layer.delta_atoms)
        torch.testing.assert_close(layer.delta_weight().reshape(-1, 9), expected, atol=1e-6, rtol=1e-5)
        # Any M is reachable: dD = V^T M gives exactly W_flat @ M.
        target = torch.randn(9, 9, generator=torch.Generator().manual_seed(3))
        layer.delta_atoms.copy_(basis.T @ target)
        torch.testing.assert_close(layer.delta_weight().reshape(-1, 9), flat(net.conv) @ target, atol=1e-5, rtol=1e-5)
    assert adapter.num_trainable == 81


def test_truncated_atoms_are_the_top_singular_subspace():
    net = Net()
    adapter = P.attach(net, "filter_atoms", targets=r"^conv$", m=4)
    layer = adapter.slots["conv"].adapter
    _, _, vh = torch.linalg.svd(flat(net.conv).double(), full_matrices=False)
    top = vh[:4].T.float()  # (9, 4)
    torch.testing.assert_close(layer.basis @ layer.basis.T, top @ top.T, atol=1e-5, rtol=0)
    randomise(adapter)
    alpha = flat(net.conv) @ layer.basis  # (out*in, m): U_m S_m
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_weight().reshape(-1, 9), alpha @ layer.delta_atoms, atol=1e-6, rtol=1e-5)
    assert adapter.num_trainable == 4 * 9


def test_overcomplete_exact_at_init_and_matches_paper_recomposition():
    net = Net()
    m, m1 = 9, 3
    adapter = P.attach(net, "filter_atoms", targets=r"^conv$", m=m, m1=m1)
    layer = adapter.slots["conv"].adapter
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert adapter.num_trainable == m * m1 * 9 + 6 * m * m1
    randomise(adapter)
    with torch.no_grad():
        atoms = layer.basis.T  # (m, 9)
        alpha = (flat(net.conv) @ layer.basis).reshape(8, 6, m)  # (out, in, m), the paper's explicit coefficients
        sub_atoms = atoms.repeat_interleave(m1, dim=0) + layer.delta_sub_atoms  # D1 (m*m1, 9)
        beta = 1.0 / m1 + layer.delta_beta  # (in, m, m1)
        per_channel = torch.einsum("ilj,ljk->ilk", beta, sub_atoms.reshape(m, m1, 9))  # D^(i): (in, m, 9)
        init = torch.einsum("oil,lk->oik", alpha, atoms)
        expected = torch.einsum("oil,ilk->oik", alpha, per_channel) - init  # W(theta) - W(theta_init)
        torch.testing.assert_close(layer.delta_weight().reshape(8, 6, 9), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("m1", [0, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("variant", ["taps_conv", "taps_unfold"])
def test_two_stage_forward_equals_the_composed_weight(m1, stride, variant):
    """The two-stage forms (W0 on the mixed taps, by a grouped conv or unfold) equal the conv with
    W0 + scale*delta, with the same atom gradients."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 64, 3, stride=stride, padding=1)
    adapter = P.attach(nn.ModuleDict({"conv": conv}), "filter_atoms", targets=r"^conv$", m1=m1)
    randomise(adapter)
    adapter.scale = 0.7
    slot = adapter.slots["conv"]
    layer = slot.adapter
    x = torch.randn(2, 6, 5, 5)
    two_stage = slot.forms(x, training=True)[variant].run(x)
    composed = conv._conv_forward(x, conv.weight + 0.7 * layer.delta_weight(), conv.bias)
    torch.testing.assert_close(two_stage, composed, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(y.square().sum(), list(layer.parameters())) for y in (two_stage, composed)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_two_stage_cost_model():
    """By multiply-adds, the tap mixing (positions x in x k^4) against composing (out x in x k^4): the
    two-stage form for few positions, the composed weight for many; one unfold / conv variant costed."""
    conv = nn.Conv2d(6, 64, 3, padding=1)
    slot = P.attach(nn.ModuleDict({"conv": conv}), "filter_atoms", targets=r"^conv$").slots["conv"]
    few, many = torch.randn(1, 6, 4, 4), torch.randn(4, 6, 64, 64)
    assert by_model(slot.forms(few, training=False)) == "taps_unfold"
    assert by_model(slot.forms(many, training=False)) == "weight"
    forms = slot.forms(torch.randn(1, 6, 16, 16), training=True)
    assert forms["taps_conv"].cost is not None and forms["taps_unfold"].cost is None  # 256 positions > UNFOLD_MAX_POSITIONS


def test_own_forms_follow_autocast():
    """Under autocast the methods' own forms compute in autocast's dtype and agree with the composed
    weight run the same way (bfloat16 on CPU stands in for fp16 on CUDA)."""
    torch.manual_seed(0)
    net = nn.ModuleDict({"conv": nn.Conv2d(6, 64, 3, padding=1), "linear": nn.Linear(64, 32)})
    filters = P.attach(net, "filter_atoms", targets=r"^conv$")
    kron = P.attach(net, "kron_atoms", targets=r"^linear$", m_c=5, kc=4)
    randomise(filters)
    randomise(kron, seed=2)
    conv, linear = net["conv"], net["linear"]
    x_conv, x_linear = torch.randn(1, 6, 5, 5), torch.randn(1, 2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairs = [
            (
                filters.slots["conv"].forms(x_conv, training=False)["taps_unfold"].run(x_conv),
                conv._conv_forward(x_conv, conv.weight + filters.slots["conv"].adapter.delta_weight(), conv.bias),
            ),
            (
                kron.slots["linear"].forms(x_linear, training=False)["activations"].run(x_linear),
                nn.functional.linear(x_linear, linear.weight + kron.slots["linear"].adapter.delta_weight(), linear.bias),
            ),
        ]
    for own, composed in pairs:
        assert own.dtype == composed.dtype == torch.bfloat16
        assert ((own.float() - composed.float()).norm() / composed.float().norm()) < 2e-2


def test_c3_is_exact_at_init_on_a_unet():
    unet = tiny_unet("sd1")
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base = run_unet(unet, inputs)
        adapter = P.attach(unet, "atoms", preset="c3")
        assert all(torch.count_nonzero(delta) == 0 for delta in adapter.deltas().values())
        assert torch.equal(run_unet(unet, inputs), base)
    assert adapter.config.m1 == 3
    assert adapter.num_trainable == adapter.expected_num_trainable()


@pytest.mark.parametrize("m1", [0, 2])
def test_tune_coefficients_trains_alpha(m1):
    net = Net()
    m = 5
    adapter = P.attach(net, "filter_atoms", targets=r"^conv$", m=m, m1=m1, tune_coefficients=True)
    layer = adapter.slots["conv"].adapter
    atom_params = m * 9 if m1 == 0 else m * m1 * 9 + 6 * m * m1
    assert adapter.num_trainable == atom_params + 8 * 6 * m == adapter.expected_num_trainable()
    assert torch.count_nonzero(layer.delta_weight()) == 0
    randomise(adapter)
    with torch.no_grad():
        alpha = flat(net.conv) @ layer.basis  # (out*in, m)
        change = layer.atom_change()  # (m, 9) or (in, m, 9)
        atoms = layer.basis.T + change
        if m1 == 0:
            expected = (alpha + layer.delta_alpha) @ atoms - alpha @ layer.basis.T
        else:
            coeff, tuned = alpha.reshape(8, 6, m), (alpha + layer.delta_alpha).reshape(8, 6, m)
            expected = torch.einsum("oil,ilk->oik", tuned, atoms) - torch.einsum("oil,lk->oik", coeff, layer.basis.T)
        torch.testing.assert_close(layer.delta_weight().reshape(expected.shape), expected.reshape(expected.shape), atol=1e-5, rtol=1e-4)
    net(torch.randn(2, 6, 4, 4)).square().mean().backward()
    assert layer.delta_alpha.grad is not None and layer.delta_alpha.grad.abs().sum() > 0


def test_kron_reconstruction_is_exact_with_all_atoms():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    kc = 4
    basis = right_singular_basis(rearrange(w, kc))  # (16, 16): m_c = kc*kc
    coeffs = rearrange(w, kc) @ basis  # (out/kc * in/kc, kc*kc): column i is A_i = s_i u_i
    rebuilt = sum(torch.kron(coeffs[:, i].reshape(4, 6), basis[:, i].reshape(kc, kc)) for i in range(kc * kc))
    torch.testing.assert_close(rebuilt, w, atol=1e-5, rtol=1e-5)


def test_kron_update_is_a_sum_of_kronecker_products():
    net = Net()
    adapter = P.attach(net, "kron_atoms", targets=r"^(linear|proj)$", m_c=5, kc=4)
    assert adapter.num_trainable == 2 * 5 * 16 == adapter.expected_num_trainable()
    randomise(adapter)
    for name in ("linear", "proj"):
        layer: KronAtomsLayer = adapter.slots[name].adapter
        w = getattr(net, name).weight.detach()
        w2 = w.reshape(w.shape[0], -1)
        coeffs = rearrange(w2, 4) @ layer.basis  # (blocks, m_c): A_i
        rows, cols = w2.shape[0] // 4, w2.shape[1] // 4
        with torch.no_grad():
            expected = sum(torch.kron(coeffs[:, i].reshape(rows, cols), layer.delta_atoms[i].reshape(4, 4)) for i in range(5))
            torch.testing.assert_close(layer.delta_weight().reshape(w2.shape), expected, atol=1e-5, rtol=1e-5)
            assert layer.delta_weight().shape == w.shape


def test_kron_activation_form_equals_the_composed_weight():
    """The per-block activation form: same output and atom gradients as the composed weight."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    adapter = P.attach(nn.ModuleDict({"linear": linear}), "kron_atoms", targets=r"^linear$", m_c=5, kc=4)
    randomise(adapter)
    adapter.scale = 0.6
    slot = adapter.slots["linear"]
    layer = slot.adapter
    x = torch.randn(2, 3, 64)
    through_activations = slot.forms(x, training=True)["activations"].run(x)
    composed = nn.functional.linear(x, linear.weight + 0.6 * layer.delta_weight(), linear.bias)
    torch.testing.assert_close(through_activations, composed, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(y.square().sum(), [layer.delta_atoms])[0] for y in (through_activations, composed)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)
    assert by_model(slot.forms(torch.randn(1, 4096, 64), training=True)) == "weight"  # many tokens: compose


def test_kron_size_not_divisible_names_the_layer():
    unet = tiny_unet("sd1")
    with pytest.raises(P.UserError, match=r"kc=5 does not divide layer '[\w.]*attn1\.to_q'"):
        P.attach(unet, "kron_atoms", kc=5, m_c=4)
    with pytest.raises(P.UserError, match=r"kc=3 does not divide layer '[\w.]*attn"):
        P.attach(tiny_unet("sd1"), "atoms", preset="c1", kc=3)


def test_option_errors():
    with pytest.raises(P.UserError, match="m=10 is more atoms than layer 'conv'"):
        P.attach(Net(), "filter_atoms", targets=r"^conv$", m=10)
    with pytest.raises(P.UserError, match="m_c must be between 1 and kc\\*kc = 16"):
        P.attach(Net(), "kron_atoms", targets="linear", kc=4, m_c=17)
    with pytest.raises(P.UserError, match="unknown preset 'c9'.*c1, c2, c3"):
        P.attach(Net(), "atoms", preset="c9", targets="conv")
    with pytest.raises(P.UserError, match="m1 must be 0"):
        P.attach(Net(), "atoms", m1=-1)
    with pytest.raises(P.UserError, match="option 'kc' of method 'atoms' must be an integer.*got 'eight'"):
        P.attach(Net(), "atoms", kc="eight")


def test_configurations_set_options_and_layer_kinds():
    unet = tiny_unet("sd2")
    counts = {}
    for preset, (m, m_c, kc, m1) in {"c1": (6, 6, 4, 0), "c2": (9, 9, 8, 0), "c3": (9, 9, 8, 3)}.items():
        adapter = P.attach(unet, "atoms", preset=preset)
        config = adapter.config
        assert (config.m, config.m_c, config.kc, config.m1) == (m, m_c, kc, m1)
        kinds = {type(slot.adapter) for slot in adapter.slots.values()}
        assert kinds == {FilterAtomsLayer, KronAtomsLayer}
        assert any(name.endswith("downsamplers.0.conv") for name in adapter.targets)
        assert any(name.endswith("attn2.to_k") for name in adapter.targets)
        assert not any(name in ("conv_in", "conv_out") or "proj_in" in name for name in adapter.targets)
        counts[preset] = adapter.num_trainable
        assert counts[preset] == adapter.expected_num_trainable()
        adapter.detach()
    assert counts["c1"] < counts["c2"] < counts["c3"]
    adapter = P.attach(unet, "atoms", preset="c1", kc=8)
    assert (adapter.config.m, adapter.config.kc) == (6, 8)


def test_loaded_adapter_uses_saved_basis_not_a_recomputed_one(tmp_path, monkeypatch):
    net = Net()
    adapter = P.attach(net, "atoms", targets=r"^(conv|proj|linear)$", m=6, m_c=5, kc=4)
    randomise(adapter)
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        live = net(x)
    path = tmp_path / "atoms.safetensors"
    adapter.save(str(path))
    # Another device could return the singular vectors with flipped signs; the file must not care.
    flipped = right_singular_basis
    for module in (filter_module, kron_module):
        monkeypatch.setattr(module, "right_singular_basis", lambda matrix: -flipped(matrix))
    fresh = Net()
    P.load_adapter(fresh, str(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), live, atol=1e-6, rtol=1e-6)


def test_deltas_stay_the_same_while_merged():
    net = Net()
    adapter = P.attach(net, "atoms", targets=r"^(conv|proj)$", kc=4, m_c=4)
    randomise(adapter)
    before = adapter.deltas()
    adapter.merge()
    after = adapter.deltas()
    adapter.unmerge()
    for name in before:
        assert torch.equal(before[name], after[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_weights(dtype, tmp_path):
    net = Net().to(dtype)
    adapter = P.attach(net, "atoms", targets=r"^(conv|linear)$", m1=2, kc=4, m_c=6)
    assert {slot.adapter.basis.dtype for slot in adapter.slots.values()} == {torch.float32}
    randomise(adapter)
    path = tmp_path / "half.safetensors"
    adapter.save(str(path))
    reference = P.load_adapter(Net().to(dtype).float(), str(path))  # same (rounded) W0 in float32
    expected = reference.deltas()
    for name, delta in adapter.deltas().items():
        assert delta.dtype == torch.float32
        torch.testing.assert_close(delta, expected[name], atol=1e-2, rtol=1e-2)


def test_damaged_basis_in_file_is_rejected(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    net = Net()
    path = tmp_path / "atoms.safetensors"
    P.attach(net, "filter_atoms", targets=r"^conv$", m=6).save(str(path))
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(path))
    tensors["conv.basis"] = tensors["conv.basis"][:, :5].contiguous()
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(P.UserError, match=r"basis of shape \(9, 5\) for layer 'conv', its config needs \(9, 6\)"):
        P.load_adapter(Net(), str(path))
