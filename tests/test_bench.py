"""`personalize bench` on the tiny model, its report files, and the core's factored (activation-space)
forward that the benchmark motivated: same outputs and gradients as composing the weight."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import personalize as P
from personalize.adapters.forms import by_model
from personalize.benchmark import BenchConfig, parse_method_spec, resolve_specs, run_benchmark, write_markdown
from personalize.benchmark.text_workload import PROMPT, TextEncoders
from personalize.benchmark.workload import Workload, unet_inputs
from personalize.cli import main
from personalize.models import tiny_pipeline
from tests.helpers import force_form

TINY = dict(base_model="tiny", resolution=32, steps=2, warmup=1, threads=1)


@pytest.fixture(scope="module")
def record():
    return run_benchmark(BenchConfig(methods=["svfit", "loldu:rank=4"], **TINY))


def test_record_has_every_method_with_paired_ratios(record):
    results = {r["label"]: r for r in record["results"]}
    assert list(results) == ["none", "lora", "svfit", "loldu:rank=4"]
    assert results["none"]["trainable"] == 0 and results["none"]["file_bytes"] == 0
    assert results["lora"]["options"] == {"rank": 4, "alpha": 4.0}
    assert results["loldu:rank=4"]["options"] == {"rank": 4}
    unet = P.load_unet("tiny", device="cpu")
    for label, method, options in (("svfit", "svfit", {}), ("loldu:rank=4", "loldu", {"rank": 4}), ("lora", "lora", {"rank": 4})):
        adapter = P.attach(unet, method, **options)
        assert results[label]["trainable"] == adapter.num_trainable == adapter.expected_num_trainable()
        adapter.detach()
        assert results[label]["file_bytes"] > 0 and results[label]["attach_s"] > 0
    for r in results.values():
        assert len(r["train_s"]) == len(r["inference_s"]) == 2
        assert all(t > 0 for t in r["train_s"] + r["inference_s"])
        assert r["train_median_s"] > 0 and r["inference_ratio_base"] > 0
        expected = sorted(t / ref for t, ref in zip(r["train_s"], results["lora"]["train_s"]))
        assert r["train_ratio_lora"] == pytest.approx(sum(expected) / 2)  # median of two paired ratios
    assert results["lora"]["train_ratio_lora"] == 1.0 and results["none"]["train_ratio_floor"] == 1.0
    for r in results.values():  # each merged forward is paired with the base forward timed just before it
        expected = sorted(t / base for t, base in zip(r["inference_s"], r["inference_base_s"]))
        assert r["inference_ratio_base"] == pytest.approx(sum(expected) / 2)
    assert all(r["memory_mb"] > 0 for r in results.values()), "a training step's activations must show as peak memory"
    env = record["environment"]
    assert env["device"] == "cpu" and env["compute_dtype"] == "float32" and env["cpu_threads"] == 1
    assert env["torch"] == torch.__version__ and env["diffusers"]
    assert record["settings"]["latent_size"] == 16


def test_markdown_section_is_replaced_not_duplicated(record, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nHand-written analysis stays.\n")
    write_markdown(record, path, tmp_path / "charts" / "bench.png")
    write_markdown(record, path, tmp_path / "charts" / "bench.png")
    text = path.read_text()
    assert "Hand-written analysis stays." in text
    assert text.count("<!-- bench:cpu-float32-32px-tiny:start -->") == 1
    assert "![train-step and merged-inference ratios](charts/bench.png)" in text
    assert "| svfit |" in text and "| lora r=4 (reference) |" in text


def test_cli_writes_json_markdown_and_chart(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code = main(
            [
                "bench",
                "--base-model",
                "tiny",
                "--resolution",
                "32",
                "--methods",
                "lora",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--threads",
                "1",
                "--output",
                str(out),
                "--markdown",
                str(tmp_path / "B.md"),
                "--profile",
                str(tmp_path / "profiles"),
            ]
        )
        assert torch.get_num_threads() == 2, "the run must give the caller's thread count back"
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["results"]] == ["none", "lora"]
    assert data["settings"]["steps"] == 1 and data["command"].startswith("personalize")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lora r=4 (reference) |" in (tmp_path / "B.md").read_text()
    assert "| lora r=4 (reference) |" in capsys.readouterr().out
    lora_profile = (tmp_path / "profiles" / "lora.txt").read_text()
    assert "== adapted layers ==" in lora_profile and "Linear" in lora_profile and "aten::" in lora_profile
    assert "== adapted layers ==" not in (tmp_path / "profiles" / "none.txt").read_text()  # the floor has none


def test_cli_text_encoder_rows(tmp_path, capsys):
    """--text-encoder: each method's step through the text encoder too, paired with its UNet-only step."""
    out, md = tmp_path / "bench.json", tmp_path / "B.md"
    argv = ["bench", "--base-model", "tiny", "--resolution", "32", "--methods", "filter_atoms", "--steps", "2", "--warmup", "1"]
    code = main([*argv, "--threads", "1", "--text-encoder", "--output", str(out), "--markdown", str(md), "--chart", ""])
    assert code == 0
    data = json.loads(out.read_text())
    results = {r["label"]: r for r in data["results"]}
    assert data["settings"]["text_encoder"] and data["text_encoders"]["text_encoder"] > 0
    assert results["none"]["text_encoder"] is None  # the frozen floor trains nothing
    assert results["filter_atoms"]["text_encoder"]["target"] is False and results["filter_atoms"]["text_encoder"]["train_s"] == []
    lora, text = results["lora"], results["lora"]["text_encoder"]
    encoder = P.load_pipeline("tiny", device="cpu").text_encoder
    assert text["target"] and text["trainable"] == P.attach_text_encoder(encoder, "lora", rank=4, alpha=4.0).num_trainable > 0
    assert len(text["train_s"]) == len(lora["train_s"]) == 2
    expected = sorted(t / u for t, u in zip(text["train_s"], lora["train_s"]))
    assert text["train_ratio_unet"] == pytest.approx(sum(expected) / 2)  # paired within each round
    for ratio in (text["train_ratio_unet"], text["train_cpu_ratio_unet"], text["memory_ratio_unet"]):
        assert math.isfinite(ratio) and ratio > 0
    assert text["memory_mb"] > 0 and text["memory_added_mb"] == pytest.approx(text["memory_mb"] - lora["memory_mb"], abs=0.11)
    section = md.read_text()
    assert "<!-- bench:cpu-float32-32px-tiny-text-encoder:start -->" in section and "#### With the text encoder training" in section
    assert "| filter_atoms | no text-encoder target |" in section and f"| lora r=4 (reference) | {text['trainable']:,} |" in section
    assert "With the text encoder training:" in capsys.readouterr().out


@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_text_conditioning_is_the_pipelines(style):
    """The bench's text step conditions the UNet as the pipeline's encode_prompt does (SDXL: both encoders' penultimate
    states, concatenated, and the second's pooled projection)."""
    pipe = tiny_pipeline(style)
    text = TextEncoders(pipe, f"tiny-{style}", 2, torch.device("cpu"))
    fixed = {"encoder_hidden_states": None, "added_cond_kwargs": {"text_embeds": None, "time_ids": torch.zeros(2, 6)}}
    with torch.no_grad():
        got = text.condition(fixed)
        want = pipe.encode_prompt(prompt=[PROMPT] * 2, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(got["encoder_hidden_states"], want[0])
    if style == "sdxl":
        torch.testing.assert_close(got["added_cond_kwargs"]["text_embeds"], want[2])
        assert got["added_cond_kwargs"]["time_ids"] is fixed["added_cond_kwargs"]["time_ids"]
    unet = pipe.unet.requires_grad_(False)
    work = Workload(unet, unet_inputs(unet, 2, 8, torch.float32, torch.device("cpu"), 0), torch.float32, torch.device("cpu"))
    adapters = [P.attach(unet, "lora"), *(attach() for attach in text.attachers("lora", {"rank": 2}))]
    before = [[p.detach().clone() for p in a.parameters()] for a in adapters]
    work.train_step([torch.optim.AdamW(a.parameter_groups()) for a in adapters], text.condition)  # backward through both
    for adapter, old in zip(adapters, before, strict=True):
        assert any(not torch.equal(p, q) for p, q in zip(adapter.parameters(), old)), "every adapter must have trained"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "dorra"], "unknown method 'dorra'"),
        (["--methods", "svfit:rnak=3"], "unknown option"),
        (["--methods", "svfit:rank"], "expected name:key=value"),
        (["--methods", "none:rank=3"], "takes no options"),
        (["--resolution", "30"], "accepted: a multiple of 4"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--profile", "__file__"], "is a file; accepted: a folder"),
        (["--chart", "__folder__"], "is a folder; accepted: a file path"),
        (["--quality", "--methods", "lora:preset=convs"], "unknown preset 'convs' for method 'lora'"),
        (["--quality", "--methods", "none"], "--quality has no 'none' method"),
        (["--quality", "--threads", "0"], "--threads must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    argv = [{"__file__": str(tmp_path / "a-file"), "__folder__": str(tmp_path)}.get(a, a) for a in argv]
    code = main(["bench", "--base-model", "tiny", "--threads", "1", "--output", str(tmp_path / "b.json"), "--markdown", "", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "b.json").exists()


def test_method_specs():
    assert parse_method_spec("atoms:preset=c3,m1=2").options == {"preset": "c3", "m1": 2}
    assert parse_method_spec("svfit:rank=none").options == {"rank": None}
    labels = [s.label for s in resolve_specs(["svfit", "lora", "none"])]
    assert labels == ["none", "lora", "svfit"]
    assert [s.label for s in resolve_specs(None)] == ["none", "lora", *[m for m in P.METHODS if m != "lora"]]
    with pytest.raises(P.UserError, match="listed twice"):
        resolve_specs(["svfit", "svfit"])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 10)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(6, 5, 1)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens).square().mean() + self.pointwise(self.conv(image)).square().mean()


@pytest.mark.parametrize(
    "method, options, paths",
    [
        ("svfit", {"rank": 3}, ("activations",)),
        ("svfit", {}, ("activations", "full")),  # full rank: U diag(s + ds) V^T alone reproduces the layer
        ("loldu", {"rank": 3, "init": "uniform"}, ("activations",)),
    ],
)
def test_factored_forms_match_composed_weight(method, options, paths, monkeypatch):
    torch.manual_seed(0)
    net = _Net()
    tokens, image = torch.randn(2, 7, 12), torch.randn(2, 4, 9, 9)
    adapter = P.attach(net, method, targets=r"^(linear|conv|pointwise)$", **options)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    adapter.scale = 0.7
    results = {}
    for path in ("weight", *paths):
        force_form(monkeypatch, path)
        loss = net(tokens, image)
        results[path] = loss.detach(), torch.autograd.grad(loss, adapter.parameters())
    loss_w, grads_w = results.pop("weight")
    for loss, grads in results.values():
        torch.testing.assert_close(loss, loss_w, rtol=1e-5, atol=1e-6)
        for g, gw in zip(grads, grads_w):
            torch.testing.assert_close(g, gw, rtol=1e-4, atol=1e-6)


def test_cost_model_picks_the_cheaper_form():
    """SVFit on a 256-wide layer, training: composing costs 2 * 256^3 + 3 * the layer, the per-token
    forms tokens x (the factors' sizes), twice when training."""
    torch.manual_seed(0)
    full_rank = P.attach(nn.Sequential(nn.Linear(256, 256)), "svfit", targets=r"^0$").slots["0"]
    assert by_model(full_rank.forms(torch.zeros(1, 64, 256), training=True)) == "full"  # U diag(s + ds) V^T alone
    assert by_model(full_rank.forms(torch.zeros(1, 4096, 256), training=True)) == "weight"  # many tokens: compose
    assert by_model(full_rank.forms(torch.zeros(1, 1024, 256), training=False)) == "weight"
    low_rank = P.attach(nn.Sequential(nn.Linear(256, 256)), "svfit", targets=r"^0$", rank=4).slots["0"]
    assert by_model(low_rank.forms(torch.zeros(1, 4096, 256), training=True)) == "activations"  # LoRA-sized: never compose
    half = P.attach(nn.Sequential(nn.Linear(256, 256).half()), "svfit", targets=r"^0$").slots["0"]
    forms = half.forms(torch.zeros(1, 64, 256, dtype=torch.half), training=True)
    assert "full" not in forms and by_model(forms) == "activations"  # 16-bit weights keep W0 in the forward
