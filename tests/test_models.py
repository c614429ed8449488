"""Base-model loading: built-in tiny models, local folders, clear errors for unreachable ids."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import personalize as P
from personalize.models import clip_tokenizer, load_unet


def test_tiny_pipeline_builds_and_generates():
    pipe = P.load_pipeline("tiny", device="cpu")
    assert pipe.unet.dtype == torch.float32
    image = pipe("a photo of sks dog", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (64, 64)


def test_tiny_unet_stays_tiny():
    """The unit tests' speed rests on the tiny UNet's size: bound its work, not one machine's clock
    (speed itself is measured by `personalize bench`, as ratios)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = load_unet("tiny", device="cpu")
    x, enc = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)  # (b, c, h, w) latents, (b, tokens, dim) text
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = unet(x, 10, enc).sample
    assert out.shape == x.shape
    assert sum(p.numel() for p in unet.parameters()) < 2_000_000  # 1.06M today
    assert counter.get_total_flops() < 1.5e9  # 0.78 GFLOP per forward today


def test_tokenizer_matches_open_clip():
    import open_clip

    ours = clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-B-32")
    for text in ["a photo of sks dog", "A cat, on the beach; at night!", "naïve café 123"]:
        ids = ours(text).input_ids
        expected = reference([text])[0]
        assert ids == expected[: len(ids)].tolist()


def test_tiny_weights_identical_across_processes():
    code = "import personalize as P; u=P.load_unet('tiny', device='cpu'); print(sum(float(p.double().sum()) for p in u.parameters()))"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)}
    here = sum(float(p.detach().double().sum()) for p in load_unet("tiny", device="cpu").parameters())
    assert len(outputs) == 1 and float(outputs.pop()) == pytest.approx(here, rel=0, abs=0)


def test_builtin_seed_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_unet("tiny", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_local_diffusers_folder_round_trip(tmp_path):
    pipe = P.load_pipeline("tiny", device="cpu")
    pipe.save_pretrained(tmp_path / "model")
    loaded = P.load_pipeline(str(tmp_path / "model"), device="cpu")
    for (name, a), b in zip(pipe.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "base_model, fragment",
    [
        ("nobody-here/does-not-exist-model", "nobody-here/does-not-exist-model"),
        ("missing-file.safetensors", "does not exist"),
        ("not a model id", "neither an existing path nor a hub id"),
    ],
)
def test_unloadable_base_model_gives_one_clear_error(base_model, fragment):
    with pytest.raises(P.UserError) as info:
        P.load_pipeline(base_model, device="cpu")
    assert fragment in str(info.value)


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(P.UserError, match="model_index.json"):
        P.load_pipeline(str(tmp_path), device="cpu")


def test_cli_reports_unreachable_model_in_one_line(tmp_path):
    code = "import sys; from personalize.cli import main; sys.exit(main(['methods', 'nope']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown method 'nope'; accepted: " + ", ".join(sorted(P.METHODS))]
