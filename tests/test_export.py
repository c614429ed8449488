"""LoRA export: every registered method's update survives the trip to a diffusers or kohya file.

At full rank the diffusers file, loaded with `pipe.load_lora_weights`, reproduces the adapted UNet,
and the kohya file, read through diffusers' own kohya converter, gives the same LoRA weights. Both
files, read the way ComfyUI reads them (`tests.tool_conventions`), patch every exported layer with its
update; the textual-inversion files are named for the word A1111 and ComfyUI prompts use; a method
whose update has a known rank exports exactly by default; an existing file is replaced only when asked.
Also: every Linear/Conv2d layer of SD 1.x- and SDXL-style UNets, SDXL's LDM key names (on the real
SDXL layout too, built on the meta device), the base-model header, the rank/energy choice, zero and
unexportable updates, the CLI and its error messages. An adapter with text-encoder parts and a learned
token (SD 1.x, 2.x, SDXL) exports its text-encoder layers (`lora_te_` / `lora_te1_` / `lora_te2_`,
`text_encoder.` / `text_encoder_2.`) and a textual-inversion file that diffusers' own loaders turn
back into the adapted pipeline.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

import personalize as P
from personalize import cli
from personalize.export import KOHYA_ALPHA, READERS, export_adapter, export_lora, kohya_names, prompt_words
from personalize.lowrank import factorize
from personalize.models import tiny_pipeline, tiny_unet
from tests.helpers import encode_text, run_unet, unet_inputs
from tests.tool_conventions import a1111_embedding_name, comfy_clip_key_map, comfy_embedding, comfy_load, comfy_unet_key_map

FULL = 10**6  # a rank above every layer's own: each layer is capped at its full rank
# Module-name parts only the diffusers UNet spells: no key of an SDXL kohya file may hold one.
DIFFUSERS_SPELLINGS = ("down_blocks", "up_blocks", "mid_block", "_attentions_", "resnets", "upsamplers", "downsamplers", "_embedding_")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def components():
    return P.load_pipeline("tiny").components


def pipeline(components, style: str = "sd1") -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A pipeline around a fresh base UNet of `style` (`load_lora_weights` is a pipeline method).

    SDXL gets the SDXL pipeline, as SDXL users load LoRAs: only its loader maps kohya's LDM names.
    """
    if style == "sdxl":
        parts = {k: components[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")}
        return StableDiffusionXLPipeline(**parts, text_encoder_2=None, tokenizer_2=None, unet=tiny_unet(style))
    return StableDiffusionPipeline(**{**components, "unet": tiny_unet(style)})


def perturbed(unet, method: str, seed: int = 0, **options) -> P.Adapter:
    """`method` attached to `unet` with every trainable tensor moved by noise, as training would."""
    adapter = P.attach(unet, method, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param, _ in adapter.named_trainables():
            size = param.abs().mean().item() or 1.0
            param.add_(0.1 * size * torch.randn(param.shape, generator=generator))
    return adapter


def lora_deltas(unet) -> dict[str, torch.Tensor]:
    """The update of every PEFT LoRA layer that diffusers installed, by module name."""
    return {
        name: module.get_delta_weight(next(iter(module.lora_A))).float()
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer) and len(module.lora_A)
    }


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """An svfit adapter file trained (perturbed) on `tiny`, and its per-layer updates."""
    unet = tiny_unet("sd1")
    adapter = perturbed(unet, "svfit")
    deltas = adapter.deltas()
    path = tmp_path_factory.mktemp("source") / "adapter.safetensors"
    adapter.save(str(path))
    return path, deltas


@pytest.fixture(scope="module")
def base_output():
    unet = tiny_unet("sd1")
    inputs = unet_inputs(unet, batch=1)
    with torch.no_grad():
        return inputs, run_unet(unet, inputs)


# LoHa's update is a Hadamard product of two small products: at alpha = r the perturbation below moves
# the tiny UNet's output by under 1%, so it is exported at a larger alpha.
EXPORT_OPTIONS = {"loha": {"alpha": 64.0}}


@pytest.mark.parametrize("method", P.METHODS)
def test_full_rank_export_reproduces_the_adapted_unet(method, components, base_output, tmp_path):
    inputs, base = base_output
    unet = tiny_unet("sd1")
    adapter = perturbed(unet, method, **EXPORT_OPTIONS.get(method, {}))
    deltas = adapter.deltas()
    with torch.no_grad():
        adapted = run_unet(unet, inputs)
    assert rel(adapted, base) > 1e-2, "the adapter must change the output far more than the tolerance below"

    loaded = {}
    for fmt in ("diffusers", "kohya"):
        output = tmp_path / f"{fmt}.safetensors"
        report = export_adapter(adapter, fmt, output=output, rank=FULL, dtype="float32")
        assert not report.skipped and {layer.name for layer in report.layers} == set(deltas)
        assert report.error < 1e-6
        assert report.file_size == output.stat().st_size
        pipe = pipeline(components)
        pipe.load_lora_weights(str(output))
        loaded[fmt] = lora_deltas(pipe.unet)
        assert set(loaded[fmt]) == set(deltas), f"{fmt}: diffusers installed LoRA on other layers"
        with torch.no_grad():
            assert rel(run_unet(pipe.unet, inputs), adapted) < 1e-4, f"{fmt} LoRA output != adapted UNet"
    for name, delta in deltas.items():
        assert rel(loaded["diffusers"][name], delta) < 1e-5, f"diffusers LoRA update of {name}"
        assert rel(loaded["kohya"][name], loaded["diffusers"][name]) < 1e-5, f"kohya != diffusers on {name}"


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_every_linear_and_conv_layer_round_trips(style, components, tmp_path):
    """Linears, 1x1 and 3x3 convs (strided ones too), time and SDXL embeddings: every layer, and the UNet output."""
    unet = tiny_unet(style)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    inputs = unet_inputs(unet, batch=1)
    adapter = perturbed(unet, "svfit", targets=r".")
    deltas = adapter.deltas()
    with torch.no_grad():
        adapted = run_unet(unet, inputs)
    source = tmp_path / "adapter.safetensors"
    adapter.save(str(source))
    reports = {"diffusers": export_adapter(adapter, "diffusers", output=tmp_path / "diffusers.safetensors", rank=FULL, dtype="float32")}
    adapter.detach()
    reports["kohya"] = export_lora(unet, source, "kohya", output=tmp_path / "kohya.safetensors", rank=FULL, dtype="float32")
    state = unet.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original), "export changed the UNet"
    with torch.no_grad():
        assert rel(adapted, run_unet(unet, inputs)) > 1e-2, "the adapter must change the output far more than the tolerance below"
    for fmt, report in reports.items():
        kinds = {layer.kind for layer in report.layers}
        assert {"linear", "conv3x3"} <= kinds and (style != "sd1" or "conv1x1" in kinds)
        pipe = pipeline(components, style)
        pipe.load_lora_weights(str(report.output))
        got = lora_deltas(pipe.unet)
        assert set(got) == set(deltas)
        for name, delta in deltas.items():
            assert rel(got[name], delta) < 1e-5, f"{style} {fmt}: {name}"
        with torch.no_grad():
            assert rel(run_unet(pipe.unet, inputs), adapted) < 1e-4, f"{style} {fmt} LoRA output != adapted UNet"
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"
    tensors = load_file(str(tmp_path / "kohya.safetensors"))
    keys = kohya_names(unet, deltas)
    assert len(set(keys.values())) == len(keys) and {f"{key}.alpha" for key in keys.values()} == {
        k for k in tensors if k.endswith(".alpha")
    }
    if style == "sdxl":  # LDM names only, as sd-scripts writes SDXL files
        assert not [k for k in tensors if any(part in k for part in DIFFUSERS_SPELLINGS)]
        assert {"lora_unet_time_embed_0", "lora_unet_label_emb_0_0", "lora_unet_input_blocks_0_0", "lora_unet_out_2"} <= set(keys.values())
    else:  # SD 1.x: the diffusers module path, as before
        assert keys == {name: "lora_unet_" + name.replace(".", "_") for name in deltas}
    for name, delta in deltas.items():
        key = keys[name]
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        r = down.shape[0]
        if delta.dim() == 4:  # LoCon: down (r, in, k, k), up (out, r, 1, 1)
            assert down.shape == (r, *delta.shape[1:]) and up.shape == (delta.shape[0], r, 1, 1)
        else:
            assert down.shape == (r, delta.shape[1]) and up.shape == (delta.shape[0], r)
        assert tensors[f"{key}.alpha"].item() == KOHYA_ALPHA


# The real SDXL base UNet's layout (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# diffusers layer -> its name in sd-scripts' SDXL UNet (library/sdxl_original_unet.py, sdxl_model_util.make_unet_conversion_map).
KOHYA_SDXL_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks_8_1_transformer_blocks_9_ff_net_2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "down_blocks.1.downsamplers.0.conv": "input_blocks_6_0_op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
    "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
    "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
    "up_blocks.0.resnets.0.conv1": "output_blocks_0_0_in_layers_2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
    "up_blocks.2.resnets.2.conv2": "output_blocks_8_0_out_layers_3",
    "conv_in": "input_blocks_0_0",
    "time_embedding.linear_1": "time_embed_0",
    "add_embedding.linear_2": "label_emb_0_2",
    "conv_out": "out_2",
}


def test_real_sdxl_layers_get_sd_scripts_names():
    """Every Linear/Conv2d of the real SDXL UNet (on the meta device: no memory) gets its own LDM name,
    and diffusers' own kohya converter maps each name back to its layer."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    names = [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    keys = kohya_names(unet, names)
    assert len(set(keys.values())) == len(names) > 700
    assert not [k for k in keys.values() if any(part in k for part in DIFFUSERS_SPELLINGS)]
    assert {name: keys[name] for name in KOHYA_SDXL_NAMES} == {name: f"lora_unet_{key}" for name, key in KOHYA_SDXL_NAMES.items()}
    state = {}
    for i, key in enumerate(keys.values()):
        state.update({f"{key}.lora_down.weight": torch.tensor([float(i)]), f"{key}.lora_up.weight": torch.zeros(1)})
        state[f"{key}.alpha"] = torch.tensor(1.0)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    back = {k.removesuffix(".lora_A.weight"): int(v.item()) for k, v in peft.items() if k.endswith(".lora_A.weight")}
    assert back == {name: i for i, name in enumerate(names)}


@pytest.mark.parametrize("style, version, v2", [("sd1", "sd_v1", "False"), ("sd2", "sd_v2", "True"), ("sdxl", "sdxl_base_v1-0", "False")])
def test_kohya_header_names_the_base_model(style, version, v2, tmp_path):
    """A1111 lists a LoRA for SDXL or SD 2.x models only if `ss_base_model_version` / `ss_v2` say so."""
    unet = tiny_unet(style)
    adapter = perturbed(unet, "svfit")
    report = export_adapter(adapter, "kohya", output=tmp_path / "kohya.safetensors", rank=2)
    with safe_open(str(report.output), framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == (version, v2)
    assert metadata["ss_sd_model_name"] == unet.config._name_or_path
    assert f"{version} base" in report.table()
    spelled = [k for k in keys if any(part in k for part in DIFFUSERS_SPELLINGS)]
    assert not spelled if style == "sdxl" else len(spelled) == len(keys)
    assert f"kohya format: loads in {READERS['kohya']}" in report.table()
    diffusers = export_adapter(adapter, "diffusers", output=tmp_path / "diffusers.safetensors", rank=2)
    assert f"diffusers format: loads in {READERS['diffusers']}" in diffusers.table() and "not A1111" in diffusers.table()


def test_fixed_rank_is_the_best_approximation_of_that_rank(adapter_file, tmp_path):
    source, deltas = adapter_file
    report = export_lora(tiny_unet("sd1"), source, "diffusers", output=tmp_path / "r3.safetensors", rank=3, dtype="float32")
    for layer in report.layers:
        s = torch.linalg.svdvals(deltas[layer.name].reshape(layer.shape[0], -1).double())
        assert layer.rank == 3 and layer.full_rank == s.numel()
        optimum = (s[3:].square().sum() / s.square().sum()).sqrt().item()  # Eckart-Young
        assert layer.error == pytest.approx(optimum, abs=1e-6)
    with safe_open(str(tmp_path / "r3.safetensors"), framework="pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == config["unet.lora_alpha"] == 3 and config["unet.rank_pattern"] == {}


def test_energy_picks_the_smallest_rank_holding_that_share(adapter_file, tmp_path):
    source, deltas = adapter_file
    report = export_lora(tiny_unet("sd1"), source, "kohya", output=tmp_path / "e.safetensors", energy=0.9, dtype="float32")
    ranks = set()
    for layer in report.layers:
        s2 = torch.linalg.svdvals(deltas[layer.name].reshape(layer.shape[0], -1).double()).square()
        share = torch.cumsum(s2, 0) / s2.sum()
        assert share[layer.rank - 1] >= 0.9 and (layer.rank == 1 or share[layer.rank - 2] < 0.9)
        assert layer.error <= (1 - 0.9) ** 0.5 + 1e-6
        ranks.add(layer.rank)
    assert len(ranks) > 1, "layers of different shapes should get different ranks"
    weighted = sum((layer.error * layer.norm) ** 2 for layer in report.layers) / sum(layer.norm**2 for layer in report.layers)
    assert report.error == pytest.approx(weighted**0.5)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_factorize_stops_at_the_numerical_rank(shape):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(shape[0], 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, shape[1], generator=generator, dtype=torch.float64
    )
    low = factorize(matrix, rank=10)
    assert (low.rank, low.full_rank) == (3, 12)
    assert rel(low.up @ low.down, matrix) < 1e-12
    assert low.up.norm(dim=0).allclose(low.down.norm(dim=1)), "singular values split evenly between the factors"
    assert factorize(torch.zeros(shape), energy=0.99).rank == 0


def test_zero_updates_are_reported_not_exported(tmp_path):
    unet = tiny_unet("sd1")
    adapter = P.attach(unet, "svfit")
    first = next(iter(adapter.slots))
    with torch.no_grad():
        adapter.slots[first].adapter.ds.add_(0.1)
    adapter.save(str(tmp_path / "one.safetensors"))
    report = export_lora(tiny_unet("sd1"), tmp_path / "one.safetensors", "kohya", output=tmp_path / "one-lora.safetensors", rank=2)
    assert [layer.name for layer in report.layers] == [first]
    assert len(report.skipped) == len(adapter.slots) - 1 and set(report.skipped.values()) == {"its update is zero"}
    with torch.no_grad():
        adapter.slots[first].adapter.ds.zero_()
    adapter.save(str(tmp_path / "zero.safetensors"))
    with pytest.raises(P.UserError, match="nothing to export"):
        export_lora(tiny_unet("sd1"), tmp_path / "zero.safetensors", "kohya", output=tmp_path / "zero-lora.safetensors", rank=2)
    assert not (tmp_path / "zero-lora.safetensors").exists()


def test_layers_without_a_lora_form_are_named_and_counted_as_lost(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Conv2d(4, 4, 3, groups=2))
    adapter = perturbed(model, "svfit", targets=r"^\d$")
    deltas = adapter.deltas()
    report = export_adapter(adapter, "kohya", output=tmp_path / "lora.safetensors", rank=FULL, dtype="float32")
    assert [layer.name for layer in report.layers] == ["0"]
    assert report.skipped == {"1": "grouped conv (groups=2) has no LoRA form"}
    assert "not exported: 1 (grouped conv (groups=2) has no LoRA form)" in report.table()
    with safe_open(str(report.output), framework="pt") as handle:
        assert "ss_base_model_version" not in handle.metadata(), "no base family for a model that is not a UNet"
    lost = deltas["1"].norm() ** 2 / (deltas["0"].norm() ** 2 + deltas["1"].norm() ** 2)
    assert report.error == pytest.approx(lost.sqrt().item(), rel=1e-4)


def test_cli_exports_text_encoder_parts_with_the_whole_pipeline(tmp_path, capsys):
    """A file with a text-encoder part and a token: the CLI loads the recorded base pipeline, not only its UNet."""
    pipe = P.load_pipeline("tiny", device="cpu")
    whole = P.PipelineAdapter(pipe, P.attach_text_encoders(pipe, "lora"), P.new_tokens(pipe, {"<sks>": "dog"}))
    with torch.no_grad():
        for param in whole.parameters():
            param.add_(0.1)
    source = whole.save(tmp_path / "adapter.safetensors")
    whole.detach()
    output = tmp_path / "lora.safetensors"
    assert cli.main(["export", "--adapter", str(source), "--rank", "2", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" in printed
    assert f"token '<sks>': textual-inversion embedding -> {tmp_path / 'sks.safetensors'}; in the prompt write 'sks' in A1111" in printed
    assert set(load_file(str(tmp_path / "sks.safetensors"))) == {"emb_params"}
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in load_file(str(output)))


def test_cli_exports_with_the_recorded_base_model(adapter_file, tmp_path, capsys):
    source, deltas = adapter_file
    output = tmp_path / "lora.safetensors"
    assert cli.main(["export", "--adapter", str(source), "--format", "kohya", "--rank", "2", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "on tiny" in printed and "overall relative error" in printed and str(output) in printed
    assert all(name in printed for name in deltas)
    tensors = load_file(str(output))
    assert len([k for k in tensors if k.endswith(".lora_down.weight")]) == len(deltas)
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if not k.endswith(".alpha")), "float16 by default"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "{tmp}/missing.safetensors"], "adapter file '.*missing.safetensors' does not exist"),
        (["--format", "onnx"], "unknown export format 'onnx'; accepted: diffusers, kohya"),
        (["--rank", "0"], "rank must be a positive integer.*got 0"),
        (["--energy", "0"], r"energy must be a number in \(0, 1\].*got 0.0"),
        (["--energy", "1.5"], r"energy must be a number in \(0, 1\].*got 1.5"),
        (["--dtype", "int8"], "unknown export dtype 'int8'; accepted: float16, bfloat16, float32"),
        (["--output", "{tmp}/lora.ckpt"], "must be a .safetensors file"),
        (["--output", "{adapter}"], "is the adapter file itself"),
    ],
)
def test_cli_errors_are_one_line(args, message, adapter_file, tmp_path, capsys):
    source, _ = adapter_file
    options = {"--adapter": str(source), "--output": str(tmp_path / "out.safetensors")}
    rest = []
    for flag, value in zip(args[::2], args[1::2]):
        value = value.format(tmp=tmp_path, adapter=source)
        if flag in options:
            options[flag] = value
        else:
            rest += [flag, value]
    argv = ["export", *[x for pair in options.items() for x in pair], *rest]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out.safetensors").exists()


def test_energy_with_a_rank_cap(adapter_file, tmp_path):
    source, _ = adapter_file
    unet = tiny_unet("sd1")
    free = export_lora(unet, source, "kohya", output=tmp_path / "free.safetensors", energy=0.95)
    capped = export_lora(unet, source, "kohya", output=tmp_path / "capped.safetensors", energy=0.95, rank=4)
    assert max(layer.rank for layer in free.layers) > 4
    assert [layer.rank for layer in capped.layers] == [min(layer.rank, 4) for layer in free.layers]


@pytest.mark.parametrize("style", ["sd1", "sdxl"])  # SD 2.x names its text encoder's layers as SD 1.x does
def test_text_encoders_and_tokens_round_trip_through_diffusers(style, tmp_path):
    """UNet, text-encoder (attention and MLP) layers and a two-vector token: the kohya and diffusers files,
    loaded with `pipe.load_lora_weights` and the embedding with `pipe.load_textual_inversion`, reproduce
    the adapted UNet and every adapted text encoder. (Every UNet layer kind is checked above; here a few.)"""
    pipe = tiny_pipeline(style)
    text = P.attach_text_encoders(pipe, "svfit", layers="attention_mlp")
    unet = P.attach(pipe.unet, "svfit", targets=r"attn2\.to_[kv]$")
    whole = P.PipelineAdapter(pipe, {"unet": unet, **text}, P.new_tokens(pipe, {"<sks>": "dog"}, num_vectors=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in whole.parameters():
            param.add_(0.3 * (param.abs().mean().item() or 1.0) * torch.randn(param.shape, generator=generator))
    prompts = ["a <sks> dog", "a photo of a cat"]
    inputs = unet_inputs(pipe.unet, batch=1)
    with torch.no_grad():
        adapted = {part: encode_text(pipe, part, prompts) for part in text}
        unet_out = run_unet(pipe.unet, inputs)
    source = whole.save(tmp_path / "adapter.safetensors")
    whole.detach()
    with torch.no_grad():  # far beyond the tolerance below, on a prompt without the token too
        for part, out in adapted.items():
            assert rel(out[1:], encode_text(pipe, part, prompts[1:])) > 1e-2, f"the adapter must change {part}"
    prefixes = {"sd1": ["lora_te_"], "sdxl": ["lora_te1_", "lora_te2_"]}[style]
    for fmt in ("kohya", "diffusers"):
        report = export_lora(pipe, source, fmt, output=tmp_path / fmt / f"{fmt}.safetensors", rank=FULL, dtype="float32")
        assert report.error < 1e-6 and {layer.part for layer in report.layers} == {"unet", *text}
        assert list(report.embeddings) == ["<sks>"] and report.embeddings["<sks>"] == tmp_path / fmt / "sks.safetensors"
        assert f"token '<sks>': textual-inversion embedding -> {tmp_path / fmt / 'sks.safetensors'}" in report.table()
        keys = load_file(str(report.output)).keys()
        if fmt == "kohya":
            assert {k.split("text_model")[0] for k in keys if "text_model" in k} == set(prefixes)
            assert f"{prefixes[-1]}text_model_encoder_layers_1_mlp_fc2.lora_down.weight" in keys
        else:
            assert {k.split(".")[0] for k in keys} == {"unet", *text}
            assert f"{[*text][-1]}.text_model.encoder.layers.1.mlp.fc2.lora_A.weight" in keys
        embedding = load_file(str(report.embeddings["<sks>"]))
        assert set(embedding) == ({"clip_l", "clip_g"} if style == "sdxl" else {"emb_params"})

        fresh = tiny_pipeline(style)
        fresh.load_lora_weights(str(report.output))
        if style == "sdxl":
            fresh.load_textual_inversion(embedding["clip_l"], token="<sks>", text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer)
            fresh.load_textual_inversion(embedding["clip_g"], token="<sks>", text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2)
        else:
            fresh.load_textual_inversion(str(report.embeddings["<sks>"]), token="<sks>")
        with torch.no_grad():
            assert rel(run_unet(fresh.unet, inputs), unet_out) < 1e-4, f"{fmt}: UNet"
            for part, out in adapted.items():
                assert rel(encode_text(fresh, part, prompts), out) < 1e-4, f"{fmt}: {part}"


def trained_pipeline(style: str, tokens: dict[str, str]) -> tuple[P.PipelineAdapter, dict[str, torch.Tensor]]:
    """svfit on every UNet Linear/Conv2d and on the text encoders' attention and MLP layers, and learned
    tokens, all moved off their start; with each layer's update by its report label."""
    pipe = tiny_pipeline(style)
    text = P.attach_text_encoders(pipe, "svfit", layers="attention_mlp")
    whole = P.PipelineAdapter(pipe, {"unet": P.attach(pipe.unet, "svfit", targets=r"."), **text}, P.new_tokens(pipe, tokens))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in whole.parameters():
            param.add_(0.3 * (param.abs().mean().item() or 1.0) * torch.randn(param.shape, generator=generator))
    deltas = {
        name if part == "unet" else f"{part}.{name}": delta for part, layers in whole.deltas().items() for name, delta in layers.items()
    }
    return whole, deltas


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_comfyui_applies_every_layer_of_either_format(style, tmp_path):
    """Read as ComfyUI's loader reads a file (its key names for the UNet and CLIP layers, its factor
    suffixes, alpha / rank): every key of the kohya and of the diffusers file is loaded, every exported
    layer is patched, with its update. (diffusers' own loader reads both files whole: the round trips above.)"""
    whole, deltas = trained_pipeline(style, {"<sks>": "dog"})
    pipe = whole.pipe
    source = whole.save(tmp_path / "adapter.safetensors")
    whole.detach()
    key_map = comfy_unet_key_map(pipe.unet)
    key_map.update(
        comfy_clip_key_map(
            {part: getattr(pipe, part).config.num_hidden_layers for part in ("text_encoder", "text_encoder_2") if getattr(pipe, part, None)}
        )
    )
    for fmt in ("kohya", "diffusers"):
        report = export_lora(pipe, source, fmt, output=tmp_path / fmt / "lora.safetensors", rank=FULL, dtype="float32")
        assert not report.skipped and {layer.label for layer in report.layers} == set(deltas)
        patches, not_loaded = comfy_load(load_file(str(report.output)), key_map)
        assert not not_loaded, f"{fmt}: ComfyUI leaves {len(not_loaded)} keys unloaded, e.g. {sorted(not_loaded)[:3]}"
        assert set(patches) == set(deltas), f"{fmt}: ComfyUI patches {len(set(patches) & set(deltas))} of {len(deltas)} layers"
        for label, delta in deltas.items():
            assert rel(patches[label].reshape(delta.shape), delta) < 1e-5, f"{style} {fmt}: ComfyUI's update of {label}"


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_embedding_files_are_named_for_the_word_each_tool_prompts_with(style, tmp_path):
    """A1111 names an embedding by its file name, ComfyUI finds `embedding:<name>` in its embeddings folder:
    a token that is a plain word is that word in both; `<sks>` is `sks`. The report says what to write."""
    whole, _ = trained_pipeline(style, {"zwx": "cat", "<sks>": "dog"})
    vectors = whole.tokens.vectors()  # {part: {token: (n_vectors, width)}}
    source = whole.save(tmp_path / "adapter.safetensors")
    whole.detach()
    report = export_lora(whole.pipe, source, "kohya", output=tmp_path / "concept-lora.safetensors", rank=2)
    assert report.embeddings == {"zwx": tmp_path / "zwx.safetensors", "<sks>": tmp_path / "sks.safetensors"}
    keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    for token, path in report.embeddings.items():
        words = prompt_words(token, path)
        assert words["A1111"] == a1111_embedding_name(path) == token.strip("<>")
        assert words == {"A1111": token.strip("<>"), "ComfyUI": f"embedding:{token.strip('<>')}", "diffusers": token}
        for part, by_token in vectors.items():
            found = comfy_embedding(words["ComfyUI"], tmp_path, keys[part])
            assert found is not None and torch.allclose(found.float(), by_token[token].float(), atol=1e-3), (
                f"ComfyUI's {part} vectors of {token}"
            )
        line = f"token '{token}': textual-inversion embedding -> {path}; in the prompt write '{words['A1111']}' in A1111"
        assert line in report.table() and f"'{words['ComfyUI']}' in ComfyUI" in report.table()


def skewed_lora(method: str, **options) -> P.Adapter:
    """`method` on the tiny UNet, moved off zero; LoRA's columns of B scaled so that two singular
    directions hold over 99% of each update (as trained LoRAs often are)."""
    adapter = perturbed(tiny_unet("sd1"), method, **options)
    if method == "lora":
        with torch.no_grad():
            for slot in adapter.slots.values():
                up = slot.layer.lora_B["default"].weight  # (out, r) or (out, r, 1, 1)
                scales = torch.tensor([1.0, 0.3, 0.03, 0.01])
                up.mul_(scales.view(1, -1, *[1] * (up.dim() - 2)))
    return adapter


@pytest.mark.parametrize(
    "method, options, bound",
    [("lora", {"preset": "attention_convs"}, 4), ("loha", {"rank": 2}, 4), ("loldu", {"rank": 4}, 4), ("aoft", {}, 8)],
)
def test_a_method_of_known_rank_exports_exactly_by_default(method, options, bound, tmp_path):
    adapter = skewed_lora(method, **options)
    report = export_adapter(adapter, "kohya", output=tmp_path / "lora.safetensors", dtype="float32")
    assert not report.truncated and all(layer.rank == layer.update_rank <= bound for layer in report.layers)
    assert max(layer.rank for layer in report.layers) == bound
    assert report.error < 1e-5
    assert "no layer truncated: each keeps its update's whole rank (default: exact where the method bounds" in report.table()
    if method == "lora":  # asked for energy, it truncates, and says how many layers and by how much
        cut = export_adapter(adapter, "kohya", output=tmp_path / "cut.safetensors", energy=0.99, dtype="float32")
        errors = sorted(layer.error for layer in cut.truncated)
        assert 0 < len(errors) <= len(cut.layers) and all(layer.rank < layer.update_rank == 4 for layer in cut.truncated)
        line = f"{len(errors)} of {len(cut.layers)} layers truncated below their update's rank (energy 0.99): "
        assert f"{line}relative error {errors[0]:.2e} to {errors[-1]:.2e}" in cut.table()


def test_a_full_rank_update_keeps_the_default_energy(adapter_file, tmp_path):
    """SVFit changes every singular value: by default its layers keep 99% of their energy, and the report counts them."""
    source, _ = adapter_file
    report = export_lora(tiny_unet("sd1"), source, "kohya", output=tmp_path / "lora.safetensors", dtype="float32")
    assert report.truncated and all(layer.error <= 0.1 + 1e-6 for layer in report.layers)
    assert (
        f"{len(report.truncated)} of {len(report.layers)} layers truncated below their update's rank (default: exact where"
        in report.table()
    )


def test_cli_refuses_to_replace_a_file_without_overwrite(tmp_path, capsys):
    pipe = P.load_pipeline("tiny", device="cpu")
    whole = P.PipelineAdapter(pipe, P.attach_text_encoders(pipe, "lora"), P.new_tokens(pipe, {"sks": "dog"}))
    with torch.no_grad():
        for param in whole.parameters():
            param.add_(0.1)
    source = whole.save(tmp_path / "adapter.safetensors")
    whole.detach()
    output, embedding = tmp_path / "lora.safetensors", tmp_path / "sks.safetensors"
    argv = ["export", "--adapter", str(source), "--rank", "2", "--output", str(output)]
    for existing, message in ((output, f"output '{output}' already exists"), (embedding, f"token 'sks', '{embedding}' already exists")):
        existing.write_bytes(b"keep me")
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err and "--overwrite" in err, err
        assert existing.read_bytes() == b"keep me"
        existing.unlink()
    assert cli.main(argv) == 0 and output.is_file() and embedding.is_file()
    assert cli.main(argv) == 2 and "already exists" in capsys.readouterr().err
    before = output.read_bytes()
    assert cli.main([*argv[:-2], "--rank", "1", "--output", str(output), "--overwrite"]) == 0
    assert output.read_bytes() != before, "--overwrite replaces the file"
    assert cli.main([*argv[:-1], str(embedding), "--overwrite"]) == 2
    assert "the embedding of token 'sks' is named 'sks.safetensors'" in capsys.readouterr().err
