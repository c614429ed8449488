"""Adapter core: targeting errors, file checks, documented counts on SD 1.5, LoLDU pivots."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

import personalize as P
from personalize.adapters import get_method
from personalize.adapters.loldu import ldu_factors, lu_no_pivot
from personalize.inject import find_targets
from personalize.models import SD15_UNET, tiny_unet


@pytest.fixture(scope="module")
def sd15_meta():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


@pytest.mark.parametrize(
    "method, options, expected",
    [("lora", {"rank": 4}, 797_184), ("svfit", {}, 93_696), ("svfit", {"rank": 32}, 4_096), ("loldu", {"rank": 32}, 4_224)],
)
def test_sd15_attention_counts(sd15_meta, method, options, expected):
    spec = get_method(method)
    config = spec.make_config(options)
    layers = find_targets(sd15_meta, spec.target_pattern(config), spec)
    assert len(layers) == 128
    assert sum(spec.count_trainable(layer, config) for layer in layers.values()) == expected


def test_attach_twice_names_the_layer():
    unet = tiny_unet()
    P.attach(unet, "svfit")
    for method in ("svfit", "lora"):
        with pytest.raises(P.UserError, match=r"layer '.*attn1\.to_q' already has an adapter"):
            P.attach(unet, method)


def test_lora_then_other_method_is_refused():
    unet = tiny_unet()
    P.attach(unet, "lora")
    with pytest.raises(P.UserError, match="already has an adapter"):
        P.attach(unet, "loldu")


def test_pattern_matching_nothing_names_the_pattern():
    with pytest.raises(P.UserError, match=r"'to_nothing\$' matches no"):
        P.attach(tiny_unet(), "svfit", targets=r"to_nothing$")


def test_unknown_option_and_preset():
    with pytest.raises(P.UserError, match="unknown option.*rnak.*accepted"):
        P.attach(tiny_unet(), "svfit", rnak=3)
    with pytest.raises(P.UserError, match="unknown preset 'everything'"):
        P.attach(tiny_unet(), "svfit", preset="everything")
    with pytest.raises(P.UserError, match="unknown method 'nomethod'"):
        P.attach(tiny_unet(), "nomethod")


def test_file_for_another_architecture_names_the_layer(tmp_path):
    path = tmp_path / "a.safetensors"
    P.attach(tiny_unet("sd1"), "loldu").save(str(path))
    with pytest.raises(P.UserError, match=r"layer '.*'.*another architecture"):
        P.load_adapter(tiny_unet("sdxl"), str(path))


def test_foreign_or_missing_file(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(P.UserError, match="does not exist"):
        P.load_adapter(tiny_unet(), str(tmp_path / "missing.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(P.UserError, match="not a personalize adapter"):
        P.load_adapter(tiny_unet(), str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(P.UserError, match="not a readable safetensors"):
        P.load_adapter(tiny_unet(), str(tmp_path / "junk.safetensors"))


def test_adapter_file_has_metadata(tmp_path):
    adapter = P.attach(tiny_unet(), "svfit", rank=4)
    path = tmp_path / "a.safetensors"
    adapter.save(str(path), metadata={"token": "sks"})
    info = P.adapter_info(str(path))
    assert info["method"] == "svfit" and info["config"]["rank"] == 4
    assert info["base_model"] == "tiny" and info["metadata"]["token"] == "sks"
    assert info["num_trainable"] == adapter.num_trainable
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file"


@pytest.mark.parametrize("shape", [(12, 12), (20, 8), (8, 20)])
def test_loldu_factors_reconstruct_and_replay_pivots(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (pl, perm), unit_u, diag = ldu_factors(w, None)
    assert torch.allclose(pl @ (diag[:, None] * unit_u), w, atol=1e-10)
    (pl2, perm2), unit_u2, diag2 = ldu_factors(w, perm)  # replaying the saved pivot order
    assert torch.equal(perm, perm2) and torch.allclose(pl, pl2) and torch.allclose(unit_u, unit_u2)


def test_lu_without_pivoting_fallback():
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 10.0]], dtype=torch.float64)  # LAPACK would swap rows
    lower, upper = lu_no_pivot(a)
    assert torch.allclose(lower @ upper, a) and torch.allclose(torch.diagonal(lower), torch.ones(3, dtype=torch.float64))


def test_loldu_uniform_init_is_documented_non_identity():
    unet = tiny_unet()
    adapter = P.attach(unet, "loldu", init="uniform")
    assert max(float(d.abs().max()) for d in adapter.deltas().values()) > 0


def test_parameter_groups_default_lr():
    adapter = P.attach(tiny_unet(), "loldu")
    groups = adapter.parameter_groups()
    assert [g["lr"] for g in groups] == [5e-4]
    assert sum(p.numel() for g in groups for p in g["params"]) == adapter.num_trainable


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_svfit_full_rank_on_16_bit_weights_starts_bit_identical(dtype):
    """Few tokens on a wide layer favour x through `U diag(s + ds) V^T` alone; with 16-bit weights that
    form would round U, s, V^T, so SVFit keeps W0 in the forward there (issue 13)."""
    torch.manual_seed(0)
    root = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(dtype)
    x = torch.randn(2, 64).to(dtype)
    with torch.no_grad():
        base = root(x)
    adapter = P.attach(root, "svfit", targets=r"^0$")
    assert torch.equal(root(x), base)
    assert adapter.slots["0"].adapter.weight_factors(1.0) is None
    float32 = P.attach(torch.nn.Sequential(torch.nn.Linear(64, 64)), "svfit", targets=r"^0$")
    assert float32.slots["0"].adapter.weight_factors(1.0) is not None  # the fast form stays for float32


def test_loldu_uniform_init_is_flagged(caplog, capsys):
    from personalize.cli import main

    with caplog.at_level("WARNING", logger="personalize.adapters.loldu"):
        P.attach(torch.nn.Sequential(torch.nn.Linear(8, 8)), "loldu", targets=r"^0$", rank=4)
        assert not caplog.records  # the default init starts at W0: nothing to say
        P.attach(torch.nn.Sequential(torch.nn.Linear(8, 8)), "loldu", targets=r"^0$", rank=4, init="uniform")
    assert "init='uniform' starts away from W0" in caplog.text
    assert main(["methods", "loldu"]) == 0
    assert "note: init='uniform' starts away from W0" in capsys.readouterr().out
