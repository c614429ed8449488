"""FRoD: joint decomposition (exact reconstruction, spec's literal QR form), grouping, sparse pattern,
parameter groups and their learning rates, single-layer groups, and a reload in a fresh process."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import personalize as P
from personalize.adapters import frod as frod_module
from personalize.adapters.base import SHARED_KEY
from personalize.adapters.declarations import ATTENTION, PROJECTIONS
from personalize.adapters.frod import (
    OFF_AXIS,
    ON_AXIS,
    FRoD,
    _FrozenLeftMatmul,
    joint_basis,
    layer_role,
    sample_off_diagonal,
)
from personalize.io import read_adapter_file
from personalize.models import tiny_unet
from tests.helpers import UNET_STYLES, force_form, run_unet, unet_inputs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def layer_factors(slot) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_i, Sigma_i, V^T) as the adapter uses them, float32: U_i = B_i / Sigma_i with B_i = W_i P."""
    adapter = slot.adapter
    inv_sigma = adapter.inv_sigma
    return adapter.b.float() * inv_sigma, 1.0 / inv_sigma, adapter.basis.vt


def literal_basis(weights: list[torch.Tensor], pi: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The spec's steps verbatim, float64: thin QR of the stack, T, eigh; returns V^T = Z^T R and B_i = Q_i Z."""
    q, r = torch.linalg.qr(torch.cat([w.double() for w in weights]))
    blocks = q.split([w.shape[0] for w in weights])
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    t = torch.stack([torch.linalg.inv(b.T @ b + pi * eye) for b in blocks]).mean(0)
    _, z = torch.linalg.eigh(t)
    return z.T @ r, [b @ z for b in blocks]


def same_rows_up_to_sign(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference of a and b after flipping a's rows to b's signs (QR and eigh fix rows only up to sign)."""
    return rel(a * torch.sign((a * b).sum(1, keepdim=True)), b)


@pytest.mark.parametrize("style", UNET_STYLES)
def test_every_layer_reconstructs(style):
    unet = tiny_unet(style)
    adapter = P.attach(unet, "frod")
    assert all(int(torch.count_nonzero(d)) == 0 for d in adapter.deltas().values()), "not unchanged at init"
    groups: dict[str, list[str]] = {}
    for name, slot in adapter.slots.items():
        groups.setdefault(slot.adapter.group, []).append(name)
    for names in groups.values():
        slots = [adapter.slots[name] for name in names]
        weights = [s.base.weight.detach().reshape(s.adapter.out, s.adapter.n) for s in slots]
        ref_vt, ref_bs = literal_basis(weights, pi=1e-3)
        assert same_rows_up_to_sign(slots[0].adapter.basis.vt.double(), ref_vt) < 1e-5, names
        for name, slot, w, ref_b in zip(names, slots, weights, ref_bs):
            ref_sigma = ref_b.norm(dim=0)  # the spec's factors: U_i = B_i / Sigma_i
            assert rel((ref_b / ref_sigma * ref_sigma) @ ref_vt, w.double()) < 1e-5, name
            u, sigma, vt = layer_factors(slot)  # what the adapter uses, float32
            assert rel(sigma.double(), ref_sigma) < 1e-5, name
            assert torch.allclose(u.norm(dim=0), torch.ones_like(sigma), atol=1e-5), name
            assert rel((u * sigma) @ vt, w) < 1e-5, name


def test_joint_basis_is_the_spec_decomposition():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(24, 16, generator=gen, dtype=torch.float64) for _ in range(4)]
    vt = joint_basis(weights, pi=1e-3)
    ref_vt, ref_bs = literal_basis(weights, pi=1e-3)
    assert same_rows_up_to_sign(vt, ref_vt) < 1e-6
    p = torch.linalg.inv(vt)
    for w, ref_b in zip(weights, ref_bs):
        b = w @ p  # B_i = Q_i Z
        sigma = b.norm(dim=0)
        assert rel(sigma, ref_b.norm(dim=0)) < 1e-6
        assert rel((b / sigma) @ torch.diag(sigma) @ vt, w) < 1e-5  # W_i = U_i Sigma_i V^T


def test_joint_basis_agrees_with_peft_frod():
    peft_frod = pytest.importorskip("peft.tuners.frod.model")
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(20, 12, generator=gen, dtype=torch.float64) for _ in range(3)]
    peft_vt = peft_frod._projection_from_weights(weights, 1e-3).T  # peft returns V = R^T Z
    assert same_rows_up_to_sign(joint_basis(weights, pi=1e-3), peft_vt) < 1e-6


def test_groups_follow_role_and_shape():
    assert layer_role("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0") == "attn2.to_out.0"
    assert layer_role("mid_block.attentions.0.transformer_blocks.0.attn1.to_q") == "attn1.to_q"
    assert layer_role("conv_in") == "conv_in"
    unet = tiny_unet("sd2")  # cross-attention width 48, block widths 32 and 64
    adapter = P.attach(unet, "frod")
    bases: dict[tuple, set[int]] = {}
    for name, slot in adapter.slots.items():
        weight = slot.base.weight
        key = (layer_role(name), tuple(weight.shape))
        bases.setdefault(key, set()).add(id(slot.adapter.basis))
        assert slot.adapter.basis.vt.shape == (weight.shape[1], weight.shape[1])
    assert all(len(ids) == 1 for ids in bases.values()), "one basis per (role, shape)"
    assert len({i for ids in bases.values() for i in ids}) == len(bases), "no basis shared across groups"
    assert ("attn2.to_k", (32, 48)) in bases and ("attn2.to_k", (64, 48)) in bases
    shared = FRoD.shared_tensors(adapter.slots)
    assert len(shared) == len(bases) and all(key.endswith(".vt") for key in shared)


def test_parameter_groups_and_learning_rates():
    adapter = P.attach(tiny_unet(), "frod")
    groups = {g["name"]: g for g in adapter.parameter_groups()}
    assert set(groups) == {ON_AXIS, OFF_AXIS}
    assert groups[ON_AXIS]["lr"] == pytest.approx(5e-4) and groups[OFF_AXIS]["lr"] == pytest.approx(5e-5)
    slots = list(adapter.slots.values())
    assert sum(p.numel() for p in groups[ON_AXIS]["params"]) == sum(s.adapter.n for s in slots)
    assert sum(p.numel() for p in groups[OFF_AXIS]["params"]) == sum(math.floor(0.01 * s.adapter.n**2) for s in slots)
    scaled = {g["name"]: g["lr"] for g in adapter.parameter_groups(lr=1e-3)}
    assert scaled == pytest.approx({ON_AXIS: 1e-3, OFF_AXIS: 1e-4})


@pytest.mark.parametrize("density", [0.0, 0.02, 0.1])
def test_density_option(density):
    adapter = P.attach(tiny_unet(), "frod", density=density)
    for slot in adapter.slots.values():
        n = slot.adapter.n
        assert slot.adapter.s_values.numel() == math.floor(density * n * n)
    assert adapter.num_trainable == adapter.expected_num_trainable()


@pytest.mark.parametrize("bad", [{"density": -0.1}, {"density": 0.9}, {"density": "lots"}, {"pi": 0.0}, {"seed": -1}, {"seed": 1.5}])
def test_bad_options_are_user_errors(bad):
    ((key, value),) = bad.items()
    # a wrong type is the option parser's message, a wrong value the method's: both name option and value
    with pytest.raises(P.UserError, match=rf"(frod {key} |option '{key}' of method 'frod' ).*{value!r}"):
        P.attach(tiny_unet(), "frod", **bad)


def test_sparse_pattern_is_seeded_off_diagonal_and_distinct():
    def pattern(seed):
        return sample_off_diagonal(40, 300, torch.Generator().manual_seed(seed))

    index = pattern(0)
    assert torch.equal(index, pattern(0)) and not torch.equal(index, pattern(1))
    assert index.numel() == 300 == index.unique().numel()
    assert not bool((index // 40 == index % 40).any())
    dense = sample_off_diagonal(6, 15, torch.Generator().manual_seed(0))  # half of all 30 off-diagonal places
    assert dense.unique().numel() == 15 and not bool((dense // 6 == dense % 6).any())
    a = P.attach(tiny_unet(), "frod", seed=3)
    b = P.attach(tiny_unet(), "frod", seed=3)
    c = P.attach(tiny_unet(), "frod", seed=4)
    name = next(iter(a.slots))
    assert torch.equal(a.slots[name].adapter.s_index, b.slots[name].adapter.s_index)
    assert not torch.equal(a.slots[name].adapter.s_index, c.slots[name].adapter.s_index)


def perturb(adapter, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param, _ in adapter.named_trainables():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.mark.parametrize(
    "style, target, rank",
    [
        ("sd2", r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k$", 32),  # (32, 48): out < in
        ("sd1", r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q$", 64),  # square
    ],
)
def test_single_layer_group(style, target, rank, tmp_path):
    unet = tiny_unet(style)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base = run_unet(unet, inputs)
    adapter = P.attach(unet, "frod", targets=target)
    ((name, slot),) = adapter.slots.items()
    assert int(torch.count_nonzero(adapter.deltas()[name])) == 0, "delta not exactly zero at init"
    with torch.no_grad():  # exact up to float32 rounding: the full form runs B (I + K) V^T with B V^T = W0
        assert rel(run_unet(unet, inputs), base) < 1e-5  # ADAPTERS.md: unchanged at init, 1e-5 relative in float32
    live = int((slot.adapter.inv_sigma > 0).sum())
    assert live == rank, "directions outside the row space of a rank-deficient stack must be dead"
    u, sigma, vt = layer_factors(slot)
    alive = slot.adapter.inv_sigma > 0
    weight = slot.base.weight.detach()
    assert rel((u[:, alive] * sigma[alive]) @ vt[alive], weight) < 1e-5  # the live part alone rebuilds W0
    perturb(adapter)
    with torch.no_grad():
        live_out = run_unet(unet, inputs)
        assert rel(live_out, base) > 1e-6
        assert bool(torch.isfinite(adapter.deltas()[name]).all())
        adapter.merge()
        assert rel(run_unet(unet, inputs), live_out) < 1e-5
        adapter.unmerge()
    path = tmp_path / "single.safetensors"
    adapter.save(str(path))
    fresh = tiny_unet(style)
    P.load_adapter(fresh, str(path))
    with torch.no_grad():
        assert torch.equal(run_unet(fresh, inputs), live_out)


def test_gradients_reach_both_groups():
    unet = tiny_unet()
    adapter = P.attach(unet, "frod")
    perturb(adapter)
    run_unet(unet, unet_inputs(unet)).pow(2).mean().backward()
    for group in adapter.parameter_groups():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in group["params"]), group["name"]


@pytest.mark.parametrize("style, targets", [("sd2", ATTENTION), ("sd1", PROJECTIONS)])  # sd1: 1x1 convs
def test_every_form_matches_the_composed_update(style, targets, monkeypatch):
    unet = tiny_unet(style)
    adapter = P.attach(unet, "frod", targets=targets)
    assert all(slot.adapter.rebuilds_w0 for slot in adapter.slots.values())
    perturb(adapter)
    adapter.scale = 0.7
    inputs = unet_inputs(unet)
    results = []
    for form in ("weight", "activations", "full"):
        force_form(monkeypatch, form)
        out = run_unet(unet, inputs)
        results.append((out.detach(), torch.autograd.grad(out.pow(2).mean(), adapter.parameters())))
    (out_w, grads_w), *others = results
    for out, grads in others:
        torch.testing.assert_close(out, out_w, rtol=1e-5, atol=1e-5)
        for g, gw in zip(grads, grads_w):
            torch.testing.assert_close(g, gw, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("plus_identity", [False, True])
def test_sparse_k_matches_the_gather_scatter_fallback(plus_identity, monkeypatch):
    """K_i as a CSR matmul (CPU, CUDA) and as gather / scatter-add (other devices): same values and gradients."""
    adapter = P.attach(tiny_unet(), "frod", density=0.2)
    perturb(adapter)
    layer = next(iter(adapter.slots.values())).adapter
    h = torch.randn(layer.n, 5, generator=torch.Generator().manual_seed(1))
    results = []
    for devices in (("cpu",), ()):
        monkeypatch.setattr(frod_module, "SPARSE_DEVICES", devices)
        x = h.clone().requires_grad_(True)
        y = layer.apply_k(x, 0.7, plus_identity)
        results.append((y.detach(), *torch.autograd.grad(y.pow(2).sum(), [x, layer.dsigma, layer.s_values])))
    dense_k = torch.diag(layer.dsigma) + torch.zeros(layer.n * layer.n).index_put((layer.s_index.long(),), layer.s_values).view(
        layer.n, layer.n
    )
    expected = 0.7 * layer.inv_sigma[:, None] * dense_k @ h + (h if plus_identity else 0)
    torch.testing.assert_close(results[0][0], expected.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["weight", "activations", "full"])
def test_forms_follow_autocast(form, monkeypatch):
    """Under autocast (bfloat16 on CPU, as fp16 on CUDA) every form runs and agrees with the float32 model."""
    unet = tiny_unet()
    adapter = P.attach(unet, "frod")
    perturb(adapter)
    inputs = unet_inputs(unet)
    force_form(monkeypatch, form)
    with torch.no_grad():
        reference = run_unet(unet, inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run_unet(unet, inputs)
    assert rel(out.float(), reference) < 5e-2


def test_fp16_w0_is_not_copied_to_float32_for_backward():
    w = torch.randn(5, 4).half()
    m = torch.randn(4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _FrozenLeftMatmul.apply(w, m)
    assert [t.dtype for t in saved] == [torch.float16]
    out.sum().backward()
    expected = torch.autograd.grad((w.float() @ m).sum(), m)[0]
    assert torch.allclose(m.grad, expected)


def test_update_is_measured_from_w0_while_merged():
    adapter = P.attach(tiny_unet(), "frod")
    perturb(adapter)
    live = adapter.deltas()
    adapter.merge()  # the layers now hold W0 + delta; the update must still be taken from W0
    merged = adapter.deltas()
    assert all(torch.equal(live[name], merged[name]) for name in live)


def test_too_wide_layers_are_refused():
    root = torch.nn.Sequential()
    root.add_module("wide", torch.nn.Linear(4097, 2))
    with pytest.raises(P.UserError, match=r"layer 'wide' has n = 4097 inputs.*n <= 4096"):
        P.attach(root, "frod", targets="wide")


def test_missing_basis_in_file_is_a_user_error(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "a.safetensors"
    P.attach(tiny_unet(), "frod").save(str(path))
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if not k.startswith(SHARED_KEY)}, str(path), metadata=header)
    with pytest.raises(P.UserError, match="no FRoD basis"):
        P.load_adapter(tiny_unet(), str(path))


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import personalize as P
    from personalize.models import tiny_unet
    from tests.helpers import run_unet, unet_inputs
    torch.set_num_threads(int(sys.argv[3]))
    unet = tiny_unet(sys.argv[2])
    adapter = P.load_adapter(unet, sys.argv[1])
    with torch.no_grad():
        torch.save({"out": run_unet(unet, unet_inputs(unet)), "deltas": adapter.deltas()}, sys.argv[1] + ".pt")
    """
)


def test_reload_in_a_fresh_process_is_exact(tmp_path):
    style = "sd2"  # has cross-attention projections narrower than their input
    unet = tiny_unet(style)
    adapter = P.attach(unet, "frod", density=0.02, seed=7)
    perturb(adapter, seed=1)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        out = run_unet(unet, inputs)
        deltas = adapter.deltas()
    path = tmp_path / "frod.safetensors"
    adapter.save(str(path))
    info = P.adapter_info(str(path))
    assert info["config"]["density"] == 0.02 and info["config"]["seed"] == 7
    assert info["layers"] == {n: list(s.base.weight.shape) for n, s in adapter.slots.items()}
    stored = read_adapter_file(path).parts["unet"].tensors
    for name, slot in adapter.slots.items():
        assert stored[name]["s_index"].dtype == torch.int32
        assert torch.equal(stored[name]["s_index"], slot.adapter.s_index)
        assert torch.equal(stored[SHARED_KEY][f"{slot.adapter.group}.vt"], slot.adapter.basis.vt)
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path), style, str(torch.get_num_threads())],
        check=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    result = torch.load(str(path) + ".pt")
    assert result["deltas"].keys() == deltas.keys()
    for name, delta in deltas.items():
        assert torch.equal(result["deltas"][name], delta), name
    assert torch.equal(result["out"], out)
