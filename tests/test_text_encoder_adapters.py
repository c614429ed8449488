"""Text-encoder adapters, learned tokens and multi-part adapter files (personalize/parts.py, tokens.py,
pipeline_adapter.py, io.py's version-2 layout), on the tiny SD 1.x, 2.x and SDXL pipelines.

The matrix: every registered method that adapts Linear layers on every text encoder of each family:
unchanged at init, only adapter tensors change after an optimiser step, merged == live, detach restores
the encoder bit-exactly, parameter counts by formula, and a file with a UNet part, the text-encoder
parts and a two-vector token loads back to the same outputs. Also: filter atoms refused, UNet-only
files as before, bare UNets refuse multi-part files, token insertion and removal, generation with two
multi-part adapters at their own strengths leaves the pipeline as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import personalize as P
from personalize.adapters import get_method
from personalize.adapters.kron_atoms import KronAtomsLayer
from personalize.generate import AdapterSpec, adapters_applied, generate
from personalize.io import read_adapter_file
from personalize.models import tiny_pipeline, tiny_unet
from personalize.parts import TEXT_LAYERS, part_model, text_parts
from tests.helpers import UNET_STYLES, encode_text, run_unet, unet_inputs

LINEAR_METHODS = [m for m in P.METHODS if any(issubclass(torch.nn.Linear, t) for t in get_method(m).layer_types)]
PROMPTS = ["a <sks> dog on the beach", "a photo of a dog"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


class SharedPipes(dict):
    """Tiny pipelines by family, built on first use, with their state when built."""

    def __init__(self) -> None:
        super().__init__()
        self.built: dict[str, tuple[dict, dict]] = {}

    def __missing__(self, style: str):
        pipe = self[style] = tiny_pipeline(style)
        self.built[style] = (state(pipe), pipe_objects(pipe))
        return pipe


@pytest.fixture(scope="module")
def shared() -> SharedPipes:
    return SharedPipes()


@pytest.fixture
def pipes(shared: SharedPipes):
    """The shared pipelines. Every test leaves them as it found them and checks that; one a failing test
    left changed is dropped, to be rebuilt by the next test."""
    yield shared
    for style in list(shared):
        try:
            assert_restored(shared[style], *shared.built[style])
        except AssertionError:
            del shared[style]


def encode(pipe, part: str, prompts=PROMPTS) -> torch.Tensor:
    return encode_text(pipe, part, prompts)


def encode_all(pipe) -> dict[str, torch.Tensor]:
    return {part: encode(pipe, part) for part in text_parts(pipe)}


def state(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of the pipeline's UNet and text encoders, by name, cloned."""
    return {f"{part}.{k}": v.clone() for part in ("unet", *text_parts(pipe)) for k, v in getattr(pipe, part).state_dict().items()}


def assert_restored(pipe, before: dict[str, torch.Tensor], objects: dict) -> None:
    """The pipeline holds the same tensors, tokenizers and embedding modules as before."""
    after = state(pipe)
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))[:3]
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"not restored: {changed[:3]}"
    assert pipe_objects(pipe) == objects, "tokenizer or embedding module not the original"


def pipe_objects(pipe) -> dict:
    found = {"tokenizer": id(pipe.tokenizer), "embedding": id(pipe.text_encoder.get_input_embeddings())}
    if getattr(pipe, "text_encoder_2", None) is not None:
        found.update(tokenizer_2=id(pipe.tokenizer_2), embedding_2=id(pipe.text_encoder_2.get_input_embeddings()))
    return found


def perturb(parameters, seed: int, size: float = 0.1) -> None:
    """Move every trainable tensor by noise, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            scale = param.abs().mean().item() or 1.0
            param.add_(size * scale * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("style", UNET_STYLES)
@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_text_encoder_matrix(method, style, pipes, tmp_path):
    pipe = pipes[style]
    before, objects = state(pipe), pipe_objects(pipe)
    with torch.no_grad():
        base = encode_all(pipe)
    text = P.attach_text_encoders(pipe, method)
    assert list(text) == text_parts(pipe) == (["text_encoder", "text_encoder_2"] if style == "sdxl" else ["text_encoder"])
    for part, adapter in text.items():
        assert adapter.num_trainable == adapter.expected_num_trainable() > 0, f"{part}: trainable count != formula"
        assert len(adapter.slots) == 2 * 4  # two layers, four attention projections each
        if method == "atoms":  # the linear (Kronecker) half only
            assert all(isinstance(slot.adapter, KronAtomsLayer) for slot in adapter.slots.values())
    with torch.no_grad():
        for part, out in encode_all(pipe).items():
            assert rel(out, base[part]) < 1e-5, f"{part} output changed at init"

    start = {part: [p.detach().clone() for p in adapter.parameters()] for part, adapter in text.items()}
    optimiser = torch.optim.AdamW([p for adapter in text.values() for p in adapter.parameters()], lr=1e-2, weight_decay=0.0)
    sum(out.pow(2).mean() for out in encode_all(pipe).values()).backward()
    optimiser.step()
    now = state(pipe)
    assert all(torch.equal(now[k], v) for k, v in before.items() if k in now), "a base tensor changed"
    for part, adapter in text.items():
        assert any(not torch.equal(p, s) for p, s in zip(adapter.parameters(), start[part])), f"no {part} adapter tensor changed"

    with torch.no_grad():
        live = encode_all(pipe)
        for part in text:
            assert rel(live[part], base[part]) > 1e-7, f"trained {part} adapter has no effect"
            text[part].merge()
            assert rel(encode(pipe, part), live[part]) < 1e-5, f"{part}: merged != live"
            text[part].unmerge()

    # one file: a UNet part, the text-encoder parts and a two-vector token in each text encoder
    tokens = P.new_tokens(pipe, {"<sks>": "dog"}, num_vectors=2)
    whole = P.PipelineAdapter(pipe, {"unet": P.attach(pipe.unet, "svfit", targets=r"attn2\.to_k$"), **text}, tokens)
    perturb([p for part, token, p in tokens.named_parameters()], seed=1, size=1.0)
    perturb(whole.parts["unet"].parameters(), seed=2)
    inputs = unet_inputs(pipe.unet, batch=1)
    with torch.no_grad():
        adapted, unet_out = encode_all(pipe), run_unet(pipe.unet, inputs)
    count = whole.num_trainable
    assert count == whole.expected_num_trainable()
    token_count = 2 * pipe.text_encoder.config.hidden_size * len(text)  # two vectors in each text encoder
    assert count == sum(a.num_trainable for a in whole.parts.values()) + token_count
    path = whole.save(tmp_path / "adapter.safetensors")
    whole.detach()
    assert_restored(pipe, before, objects)

    loaded = P.load_adapter(pipe, path)
    assert isinstance(loaded, P.PipelineAdapter) and list(loaded.parts) == ["unet", *text_parts(pipe)]
    assert loaded.tokens.tokens == ["<sks>"] and loaded.num_trainable == loaded.expected_num_trainable() == count
    with torch.no_grad():
        for part, out in encode_all(pipe).items():
            assert rel(out, adapted[part]) < 1e-5, f"{part}: save/load round trip changed the output"
        assert rel(run_unet(pipe.unet, inputs), unet_out) < 1e-5
    loaded.detach()
    assert_restored(pipe, before, objects)


def test_file_layout_and_info(pipes, tmp_path):
    pipe = pipes["sdxl"]
    whole = P.PipelineAdapter(
        pipe,
        {
            "unet": P.attach(pipe.unet, "svfit"),
            **P.attach_text_encoders(pipe, "lora", parts=["text_encoder_2"], layers="attention_mlp", rank=2),
        },
        P.new_tokens(pipe, {"<a.b>": "cat"}, num_vectors=3, parts=["text_encoder"]),
    )
    assert len(whole.parts["text_encoder_2"].slots) == 2 * 6  # attention projections and MLP linears
    path = whole.save(tmp_path / "a.safetensors", metadata={"token": "<a.b>"})
    count = whole.num_trainable
    whole.detach()
    with safe_open(str(path), framework="pt") as handle:
        header, keys = handle.metadata(), set(handle.keys())
    assert header["format_version"] == "2" and "method" not in header
    assert "text_encoder.__token__.<a.b>" in keys and "text_encoder_2.encoder.layers.1.mlp.fc2.lora_A" in keys
    assert any(k.startswith("unet.down_blocks.") for k in keys)
    info = P.adapter_info(path)
    assert info["method"] == "svfit" and list(info["parts"]) == ["unet", "text_encoder_2"]
    assert info["parts"]["text_encoder_2"]["method"] == "lora" and info["tokens"] == {"text_encoder": {"<a.b>": 3}}
    assert info["num_trainable"] == count and info["metadata"]["token"] == "<a.b>"


def test_unet_only_files_keep_their_layout_and_load_as_before(pipes, tmp_path):
    """A file in the original layout (as the version-1 writer wrote it) loads into a bare UNet and into a
    pipeline; a UNet-only adapter is still written in that layout."""
    unet = tiny_unet("sd1")
    adapter = P.attach(unet, "svfit")
    perturb(adapter.parameters(), seed=3)
    tensors = {f"{layer}.{name}": t.contiguous() for layer, slot in adapter.slots.items() for name, t in slot.saved_tensors().items()}
    header = {
        "format": "personalize.adapter",
        "format_version": "1",
        "method": "svfit",
        "config": '{"preset": "attention", "targets": null, "rank": null}',
        "layers": str({name: list(slot.base.weight.shape) for name, slot in adapter.slots.items()}).replace("'", '"'),
        "base_model": "tiny",
        "num_trainable": str(adapter.num_trainable),
        "metadata": '{"token": "sks"}',
    }
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=header)
    inputs = unet_inputs(unet, batch=1)
    with torch.no_grad():
        expected = run_unet(unet, inputs)
    assert P.adapter_info(old)["tokens"] == {} and list(P.adapter_info(old)["parts"]) == ["unet"]
    fresh = tiny_unet("sd1")
    loaded = P.load_adapter(fresh, old)
    assert isinstance(loaded, P.Adapter) and loaded.metadata == {"token": "sks"}
    with torch.no_grad():
        assert rel(run_unet(fresh, inputs), expected) < 1e-6
    written = loaded.save(tmp_path / "new.safetensors")
    with safe_open(str(written), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "1" and set(handle.keys()) == set(tensors)

    pipe = pipes["sd1"]
    before, objects = state(pipe), pipe_objects(pipe)
    whole = P.load_adapter(pipe, old)
    assert list(whole.parts) == ["unet"] and whole.tokens is None
    whole.detach()
    assert_restored(pipe, before, objects)


def test_damaged_multi_part_files_are_one_line_errors(pipes, tmp_path):
    pipe = pipes["sd1"]
    before, objects = state(pipe), pipe_objects(pipe)
    source = make_file(pipe, tmp_path / "a.safetensors", "lora", "<sks>", seed=7, unet=False)
    with safe_open(source, framework="pt") as handle:
        header = dict(handle.metadata())
    flat = load_file(source)
    token_key = "text_encoder.__token__.<sks>"
    cases = {
        "token without vectors": (
            flat,
            {**header, "tokens": '{"text_encoder": ["<sks>", "<x>"]}'},
            "lists token '<x>' of text_encoder but holds no vectors",
        ),
        "vectors of no listed token": (
            {**flat, "text_encoder.__token__.<y>": torch.ones(1, 32)},
            header,
            "token vectors .*<y>' not listed",
        ),
        "tensor of no part": ({**flat, "vae.conv.w": torch.ones(1)}, header, "holds tensor 'vae.conv.w' of no part"),
        "unknown part": (flat, {**header, "parts": header["parts"].replace("text_encoder", "vae")}, "lists a part named 'vae'"),
        "NaN vectors": (
            {**flat, token_key: torch.full_like(flat[token_key], float("nan"))},
            header,
            "token '<sks>' of text_encoder holds NaN",
        ),
    }
    for name, (tensors, meta, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(P.UserError, match=message) as error:
            P.load_adapter(pipe, path)
        assert str(path) in str(error.value) and "\n" not in str(error.value), name
    assert_restored(pipe, before, objects)


def test_a_bare_unet_refuses_a_file_with_text_parts(pipes, tmp_path):
    pipe = pipes["sd1"]
    whole = P.PipelineAdapter(pipe, P.attach_text_encoders(pipe, "lora"))
    path = whole.save(tmp_path / "text.safetensors")
    whole.detach()
    unet = tiny_unet("sd1")
    for load in (lambda: P.load_adapter(unet, path), lambda: P.export_lora(unet, path, output=tmp_path / "lora.safetensors")):
        with pytest.raises(P.UserError, match=r"holds parts text_encoder: load it into the pipeline") as error:
            load()
        assert "\n" not in str(error.value)
    with pytest.raises(P.UserError, match=r"has a text_encoder part, which a bare UNet cannot take"):
        with adapters_applied(unet, [AdapterSpec(str(path))]):
            pass
    assert not any(hasattr(m, "personalize_adapter") for m in unet.modules())


def test_filter_atoms_is_refused_on_text_encoders(pipes):
    pipe = pipes["sdxl"]
    before, objects = state(pipe), pipe_objects(pipe)
    with pytest.raises(
        P.UserError, match=r"^method 'filter_atoms' adapts only Conv2d layers .*a text encoder has only Linear layers"
    ) as error:
        P.attach_text_encoders(pipe, "filter_atoms")
    assert "\n" not in str(error.value)
    with pytest.raises(P.UserError, match=r"unknown text-encoder layers 'mlp'; accepted: attention, attention_mlp"):
        P.attach_text_encoders(pipe, "lora", layers="mlp")
    with pytest.raises(P.UserError, match=r"this pipeline has no text_encoder_2"):
        P.attach_text_encoders(pipes["sd1"], "lora", parts=["text_encoder_2"])
    assert_restored(pipe, before, objects)
    assert set(TEXT_LAYERS) == {"attention", "attention_mlp"}


def test_tokens_insert_stack_and_remove_exactly(pipes):
    pipe = pipes["sd1"]
    before, objects = state(pipe), pipe_objects(pipe)
    size = len(pipe.tokenizer)
    word = pipe.tokenizer("sunflower", add_special_tokens=False).input_ids
    first = P.new_tokens(pipe, {"<sks>": "sunflower"}, num_vectors=3)
    table = pipe.text_encoder.get_input_embeddings()
    vectors = first.vectors()["text_encoder"]["<sks>"]  # (3, width)
    expected = [word[i % len(word)] for i in range(3)]  # piece i mod pieces, as sd-scripts initialises
    assert torch.equal(vectors, table.base.weight[expected])
    assert len(pipe.tokenizer) == size + 3 and table.weight.shape == (size + 3, 32) and table.num_embeddings == size + 3
    assert pipe.maybe_convert_prompt("a <sks> dog", pipe.tokenizer) == "a <sks> <sks>_1 <sks>_2 dog"
    ids = pipe.tokenizer("a <sks> <sks>_1 <sks>_2 dog", return_tensors="pt").input_ids
    assert ids[0, 2:5].tolist() == [size, size + 1, size + 2]
    second = P.insert_tokens(pipe, {"text_encoder": {"<zwx>": torch.ones(1, 32)}})
    with torch.no_grad():
        rows = pipe.text_encoder.get_input_embeddings()(torch.tensor([[size + 1, size + 3, 5]]))  # (1, 3, width)
    assert torch.equal(rows[0, 0], vectors[1]) and torch.equal(rows[0, 1], torch.ones(32)) and torch.equal(rows[0, 2], table.base.weight[5])
    with pytest.raises(P.UserError, match="'<sks>' is already a token of the tokenizer"):
        P.insert_tokens(pipe, {"text_encoder": {"<sks>": torch.ones(1, 32)}})
    with pytest.raises(P.UserError, match=r"are \(2, 16\); expected \(n_vectors, 32\)"):
        P.insert_tokens(pipe, {"text_encoder": {"<new>": torch.ones(2, 16)}})
    with pytest.raises(P.UserError, match="remove those first"):
        first.remove()
    second.remove()
    first.remove()
    first.remove()  # a second removal does nothing
    assert_restored(pipe, before, objects)
    assert len(pipe.tokenizer) == size


def test_parameter_groups_and_strength(pipes):
    pipe = pipes["sdxl"]
    before, objects = state(pipe), pipe_objects(pipe)
    whole = P.PipelineAdapter(
        pipe, {"unet": P.attach(pipe.unet, "frod"), **P.attach_text_encoders(pipe, "svfit")}, P.new_tokens(pipe, {"<sks>": "dog"})
    )
    groups = {g["name"]: g for g in whole.parameter_groups(lr=1e-4, lrs={"text_encoder_2": 1e-5, "tokens": 5e-3})}
    assert set(groups) == {"unet:on_axis", "unet:off_axis", "text_encoder:main", "text_encoder_2:main", "tokens"}
    assert groups["unet:on_axis"]["lr"] == 1e-4 and groups["unet:off_axis"]["lr"] == pytest.approx(1e-5)  # FRoD's ratio kept
    assert groups["text_encoder:main"]["lr"] == 1e-4 and groups["text_encoder_2:main"]["lr"] == 1e-5 and groups["tokens"]["lr"] == 5e-3
    assert sum(len(g["params"]) for g in groups.values()) == len(whole.parameters())
    assert all(p.requires_grad for p in whole.parameters())
    with pytest.raises(P.UserError, match="learning rate given for 'vae'"):
        whole.parameter_groups(lrs={"vae": 1.0})
    perturb(whole.parameters(), seed=4)
    whole.scale = 0.0
    with torch.no_grad():
        assert all(torch.equal(d, torch.zeros_like(d)) for deltas in whole.deltas().values() for d in deltas.values())
    whole.scale = 1.0
    with torch.no_grad():
        live = encode(pipe, "text_encoder_2", ["a photo of a dog"])
        with whole.switched_off():
            off = encode(pipe, "text_encoder_2", ["a photo of a dog"])
        assert rel(live, off) > 1e-4 and rel(encode(pipe, "text_encoder_2", ["a photo of a dog"]), live) == 0
    whole.detach()
    assert_restored(pipe, before, objects)


def make_file(pipe, path, text_method: str, token: str, seed: int, unet: bool) -> str:
    """An adapter of `pipe` with random trained tensors: text-encoder parts, a token, and a UNet part if `unet`."""
    parts = P.attach_text_encoders(pipe, text_method)
    if unet:
        parts["unet"] = P.attach(pipe.unet, "svfit")
    whole = P.PipelineAdapter(pipe, parts, P.new_tokens(pipe, {token: "dog"}, num_vectors=2))
    perturb(whole.parameters(), seed, size=0.5)
    whole.save(path, metadata={"token": token, "class_noun": "dog"})
    whole.detach()
    return str(path)


def test_generate_applies_every_part_and_restores_the_pipeline(pipes, tmp_path):
    pipe = pipes["sd1"]
    first = make_file(pipe, tmp_path / "a.safetensors", "lora", "<sks>", seed=5, unet=True)
    second = make_file(pipe, tmp_path / "b.safetensors", "svfit", "<zwx>", seed=6, unet=False)
    before, objects = state(pipe), pipe_objects(pipe)
    with torch.no_grad():
        base = encode(pipe, "text_encoder", ["a photo of a dog"])
    expected = {}
    for path, scale in ((first, 0.5), (second, -1.0)):
        loaded = P.load_adapter(pipe, path)
        loaded.scale = scale
        for part, deltas in loaded.deltas().items():
            for name, delta in deltas.items():
                expected[(part, name)] = expected.get((part, name), 0) + delta
        loaded.detach()
    with adapters_applied(pipe, [AdapterSpec(first, 0.5), AdapterSpec(second, -1.0)]):
        for (part, name), delta in expected.items():
            weight = part_model(pipe, part).get_submodule(name).weight
            torch.testing.assert_close(weight, before[f"{part}.{name}.weight"] + delta, rtol=1e-5, atol=1e-6)
        assert {part for part, _ in expected} == {"unet", "text_encoder"}
        assert pipe.maybe_convert_prompt("<sks> <zwx>", pipe.tokenizer) == "<sks> <sks>_1 <zwx> <zwx>_1"
        with torch.no_grad():
            assert rel(encode(pipe, "text_encoder", ["a photo of a dog"]), base) > 1e-3
    assert_restored(pipe, before, objects)

    kwargs = dict(num_images=1, seed=3, steps=2)
    plain = generate(pipe, "a {token} dog", adapters=[AdapterSpec(first, 0.0)], **kwargs)  # off: the words themselves
    adapted = generate(pipe, "a {token} dog", adapters=[AdapterSpec(first), AdapterSpec(second, 0.5)], **kwargs)
    assert adapted[0].prompt == "a <sks> dog"
    assert not np.array_equal(np.asarray(plain[0].image), np.asarray(adapted[0].image))
    assert_restored(pipe, before, objects)
    assert read_adapter_file(first).tokens["text_encoder"]["<sks>"].shape == (2, 32)
