"""The per-machine form cache (adapters/forms.py), the decomposition cache (adapters/decompositions.py)
and `personalize cache`: choices made once and reused, warm attach bit for bit the cold one, bad
entries ignored and rewritten, weights that changed recomputed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import personalize as P
from personalize.adapters import decompositions, forms
from personalize.adapters import frod as frod_module
from personalize.cli import main
from personalize.models import tiny_unet
from tests.helpers import run_unet, unet_inputs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    forms.forget()
    yield tmp_path / "cache"
    forms.forget()


def count_timings(monkeypatch) -> list[str]:
    timed: list[str] = []
    original = forms.time_form

    def counting(form, *args):
        timed.append(form)
        return original(form, *args)

    monkeypatch.setattr(forms, "time_form", counting)
    return timed


def svfit_layer() -> tuple[nn.Module, P.Adapter]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32))
    adapter = P.attach(net, "svfit", targets=r"^0$")
    with torch.no_grad():
        adapter.slots["0"].adapter.ds.add_(torch.randn(32) * 0.1)
    return net, adapter


def test_form_is_measured_once_then_reused_from_memory_and_disk(cache, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_FORMS", "measure")
    timed = count_timings(monkeypatch)
    net, adapter = svfit_layer()
    x = torch.randn(2, 5, 32)
    with forms.form_choice("model"):
        expected = net(x).sum()
    net(x).sum().backward()  # training: every form timed, forward and backward
    slot = adapter.slots["0"]
    assert len(timed) == 3 and slot.form in ("weight", "activations", "full")
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in adapter.parameters())  # timing left .grad alone
    first = slot.form
    torch.testing.assert_close(net(x).sum(), expected, rtol=1e-5, atol=1e-5)  # every form exact
    assert len(timed) == 3  # the same key: no second measurement
    [file] = (cache / "forms").glob("*.json")
    stored = json.loads(file.read_text())
    assert list(stored["choices"].values()) == [first] and "cpu" in stored["machine"]
    forms.forget()  # a new process: the choice comes from the disk
    net(x).sum().backward()
    assert len(timed) == 3 and slot.form == first
    with torch.no_grad():
        net(x)  # inference is another key
    assert len(timed) == 6


def test_bad_form_cache_entries_are_ignored_and_rewritten(cache, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_FORMS", "measure")
    timed = count_timings(monkeypatch)
    net, adapter = svfit_layer()
    x = torch.randn(2, 5, 32)
    net(x)
    [file] = (cache / "forms").glob("*.json")
    stored = json.loads(file.read_text())
    stored["choices"] = {key: "no_such_form" for key in stored["choices"]}
    file.write_text(json.dumps(stored))
    forms.forget()
    net(x)
    assert len(timed) == 6 and adapter.slots["0"].form != "no_such_form"
    assert "no_such_form" not in file.read_text()  # rewritten
    file.write_text("{not json")
    forms.forget()
    net(x)
    assert len(timed) == 9 and json.loads(file.read_text())["choices"]


def test_model_mode_never_times(cache, monkeypatch):
    timed = count_timings(monkeypatch)
    net, adapter = svfit_layer()
    with forms.form_choice("model"):
        net(torch.randn(2, 5, 32))
    assert not timed and not (cache / "forms").exists()
    monkeypatch.setenv("PERSONALIZE_FORMS", "fastest")
    with pytest.raises(P.UserError, match="PERSONALIZE_FORMS='fastest'.*accepted: measure, model"):
        net(torch.randn(2, 5, 32))


def adapter_state(adapter: P.Adapter) -> dict[str, torch.Tensor]:
    state = {f"{name}.{key}": value.clone() for name, slot in adapter.slots.items() for key, value in slot.adapter.named_buffers()}
    state.update({f"{name}.rebuilds_w0": torch.tensor(getattr(slot.adapter, "rebuilds_w0", False)) for name, slot in adapter.slots.items()})
    return state


def perturb(adapter: P.Adapter) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("method", ["svfit", "loldu", "frod"])
def test_warm_attach_equals_cold_attach_bit_for_bit(method, cache, monkeypatch):
    unet = tiny_unet()
    inputs = unet_inputs(unet)
    cold = P.attach(unet, method)
    cold_state = adapter_state(cold)
    perturb(cold)
    with torch.no_grad():
        cold_out = run_unet(unet, inputs)
    cold.detach()
    assert list((cache / "decompositions").glob(f"{'svd' if method == 'svfit' else 'ldu' if method == 'loldu' else 'frod'}-*"))

    def no_decomposition(*args, **kwargs):
        raise AssertionError("a warm attach must not decompose")

    monkeypatch.setattr(torch.linalg, "svd", no_decomposition)
    monkeypatch.setattr(torch.linalg, "lu", no_decomposition)
    monkeypatch.setattr(frod_module, "joint_basis", no_decomposition)
    warm = P.attach(unet, method)
    warm_state = adapter_state(warm)
    assert warm_state.keys() == cold_state.keys()
    for key in cold_state:
        assert torch.equal(warm_state[key], cold_state[key]), key
    perturb(warm)
    with torch.no_grad():
        assert torch.equal(run_unet(unet, inputs), cold_out)


@pytest.mark.parametrize("method", ["loldu", "frod"])
def test_loading_an_adapter_reads_the_cached_decomposition(method, cache, tmp_path, monkeypatch):
    """A file stores LoLDU's pivot order / FRoD's basis; where the cache holds the same, it is used."""
    unet = tiny_unet()
    adapter = P.attach(unet, method)
    perturb(adapter)
    path = tmp_path / "adapter.safetensors"
    adapter.save(str(path))
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = run_unet(unet, inputs)
    adapter.detach()
    calls = []
    monkeypatch.setattr(torch.linalg, "lu", lambda *a, **k: calls.append("lu"))
    monkeypatch.setattr(frod_module, "joint_basis", lambda *a, **k: calls.append("joint"))
    monkeypatch.setattr(frod_module, "inverse_transpose", lambda *a, **k: calls.append("inverse"))
    P.load_adapter(unet, str(path))
    assert not calls
    with torch.no_grad():
        assert torch.equal(run_unet(unet, inputs), expected)


def test_changed_weights_and_bad_entries_are_recomputed(cache, monkeypatch):
    unet = tiny_unet()
    P.attach(unet, "svfit").detach()
    entries = sorted((cache / "decompositions").glob("svd-*"))
    assert entries
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or svd(*a, **k))
    layer = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3  # another weight hash: that layer only is recomputed
    adapter = P.attach(unet, "svfit")
    assert len(calls) == 1
    u, s, vh = (
        adapter.slots["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].adapter.__getattr__(n) for n in ("u", "s", "vh")
    )
    torch.testing.assert_close(u @ torch.diag(s) @ vh, layer.weight.detach(), rtol=1e-5, atol=1e-5)
    adapter.detach()
    entries[0].write_bytes(b"not a safetensors file")  # damaged
    entries[1].write_bytes(entries[2].read_bytes())  # intact, but made for another weight
    calls.clear()
    P.attach(unet, "svfit").detach()
    assert len(calls) == 2
    calls.clear()
    P.attach(unet, "svfit").detach()  # both rewritten
    assert not calls


def test_decomposition_cache_modes(cache, monkeypatch):
    unet = tiny_unet()
    with decompositions.decomposition_cache("off"):
        P.attach(unet, "svfit").detach()
    assert not (cache / "decompositions").exists()
    P.attach(unet, "svfit").detach()
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or svd(*a, **k))
    with decompositions.decomposition_cache("refresh"):  # the benchmark's cold attach
        P.attach(unet, "svfit").detach()
    assert calls
    with pytest.raises(P.UserError, match="accepted: use, refresh, off"):
        with decompositions.decomposition_cache("always"):
            pass


def test_cache_size_cap_evicts_least_recently_used(cache, monkeypatch):
    unet = tiny_unet()
    monkeypatch.setenv("PERSONALIZE_DECOMPOSITIONS_GB", "0.00002")  # 20 kB: a few of tiny's entries
    P.attach(unet, "svfit").detach()
    total = sum(p.stat().st_size for p in (cache / "decompositions").iterdir())
    assert 0 < total <= 20_000 + max(p.stat().st_size for p in (cache / "decompositions").iterdir())


def test_cache_command_shows_and_clears(cache, capsys):
    P.attach(tiny_unet(), "svfit").detach()
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out and "decompositions" in out
    assert main(["cache", "--clear", "decompositions"]) == 0
    assert "cleared" in capsys.readouterr().out
    assert not (cache / "decompositions").exists()


@pytest.mark.parametrize("reentrant", [True, False])
def test_measuring_inside_gradient_checkpointing(reentrant, cache, monkeypatch):
    """Forms timed in the first (checkpointed) forward: the recomputation in backward finds the choice
    made and the gradients equal those of the model-chosen forms."""
    monkeypatch.setenv("PERSONALIZE_FORMS", "measure")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    adapter = P.attach(net, "svfit", targets=r"^(0|2)$")
    perturb(adapter)
    x = torch.randn(4, 32, requires_grad=True)
    grads = []
    for mode in ("measure", "model"):
        with forms.form_choice(mode):
            torch.utils.checkpoint.checkpoint(net, x, use_reentrant=reentrant).square().sum().backward()
        grads.append([p.grad.clone() for p in adapter.parameters()])
        for p in adapter.parameters():
            p.grad = None
    for measured, modelled in zip(*grads):
        torch.testing.assert_close(measured, modelled, rtol=1e-4, atol=1e-5)
