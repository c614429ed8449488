"""The GPU check (`benchmarks/gpu-check.sh`) in its CPU smoke mode, end to end through the script, so it
cannot rot while no GPU is lent; its time budget (the supervisor's deadline, `bench --time-limit`); and
the GPU plan's arguments, parsed by `personalize bench` here."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from personalize.adapters import method_names
from personalize.benchmark import BenchConfig, run_benchmark
from personalize.benchmark.budget import INFERENCE_PER_TRAIN, TimeLimit
from personalize.benchmark.gpu_check import FULL, PRIORITY, QUALITY_METHODS, SMOKE, Report, main, plan, run_parts, supervise
from personalize.benchmark.report import markdown_section
from personalize.cli import main as cli_main
from personalize.commands import bench
from personalize.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_record_and_section(tmp_path):
    json_path, md_path = tmp_path / "check.json", tmp_path / "check.md"
    env = {**os.environ, "PYTHON": sys.executable}
    argv = ["bash", str(ROOT / "benchmarks" / "gpu-check.sh"), "--smoke", "--work-dir", str(tmp_path / "work")]
    done = subprocess.run([*argv, "--json", str(json_path), "--markdown", str(md_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(json_path.read_text())
    assert record["format"] == "personalize.gpu-check" and record["mode"] == "smoke"
    parts = {p["name"]: p for p in record["parts"]}
    assert list(parts) == ["speed-fp32", "speed-bf16", "quality"]
    assert all(p["status"] == "done" for p in parts.values()), [(p["name"], p["message"]) for p in parts.values()]
    assert parts["speed-bf16"]["record"]["environment"]["compute_dtype"] == "bfloat16"  # the precision reached the bench
    assert parts["speed-fp32"]["time_limit_s"] > 0 and "--time-limit" in parts["speed-fp32"]["command"]
    rows = {row["method"]: row for row in record["summary"]}
    assert list(rows) == ["none", "lora"]
    for row in rows.values():
        for precision in ("fp32", "bf16"):
            values = row["precisions"][precision]
            assert values["train_step_s"] > 0 and values["vs_lora"] > 0 and values["peak_memory_mb"] >= 0
        assert row["merged_inference_s"] > 0 and row["measured_in"] == "fp32"
    assert rows["lora"]["precisions"]["bf16"]["vs_lora"] == 1.0 and rows["lora"]["attach_s"] > 0 and rows["lora"]["trainable"] > 0
    quality = {row["label"]: row for tier in parts["quality"]["record"]["tiers"].values() for row in tier["rows"]}
    assert quality[QUALITY_METHODS[0]]["trainable"] > 0 and quality[QUALITY_METHODS[0]]["scores"]["images"] > 0
    assert parts["quality"]["record"]["settings"]["steps"] == 2  # --quality-steps reached the quality bench

    text = md_path.read_text()
    key = "gpu-check-cpu-32px-tiny"
    assert text.startswith(f"<!-- bench:{key}:start -->") and text.rstrip().endswith(f"<!-- bench:{key}:end -->")
    assert "| Method | Trainable | fp32 step (ms) | vs LoRA | bf16 step (ms) | vs LoRA | Peak memory fp32 / bf16 (MB) |" in text
    assert "\n| lora | " in text and "#### CPU, float32, 32 px, `tiny`" in text and "#### CPU, bfloat16 autocast, 32 px, `tiny`" in text
    assert f"| {QUALITY_METHODS[0]} |" in text and "- quality on `shapes`: done in" in text
    assert f"wrote {json_path}" in done.stdout


def test_full_plan_is_what_bench_accepts(tmp_path):
    """The GPU run's parts cannot be run here, but their arguments are parsed and checked here."""
    parts = plan(FULL, tmp_path, 440, skip=["speed-bf16"])
    assert [p.name for p in parts] == ["speed-fp16", "speed-bf16", "quality"]
    assert parts[1].status == "skipped" and parts[0].status == parts[2].status == "pending"
    assert sum(p.share_s for p in parts) <= 440
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for part, precision in zip(parts[:2], ("fp16", "bf16")):
        args = parser.parse_args(part.argv[1:])
        assert (args.base_model, args.resolution, args.device, args.precision) == ("sd15-random", 512, "cuda", precision)
        expected = [m for m in PRIORITY if m in method_names()]
        assert args.methods[: len(expected)] == expected and sorted(args.methods) == sorted(set(method_names()) - {"lora"})
        BenchConfig(methods=args.methods, time_limit=100).validate()  # every method spec is known
    args = parser.parse_args(parts[2].argv[1:])
    assert args.quality and args.methods == list(QUALITY_METHODS) and len(args.concepts) == 1 and args.quality_steps is None
    with pytest.raises(UserError, match="unknown part 'speed-fp32'"):
        plan(FULL, tmp_path, 440, skip=["speed-fp32"])


def test_parts_without_time_left_are_skipped(tmp_path):
    report = Report(tmp_path / "c.json", tmp_path / "c.md", SMOKE, "gpu-check.sh --smoke", 440)
    parts = plan(SMOKE, tmp_path, 440, skip=[])
    run_parts(parts, time.time() + 5, report)  # 5 s left: less than any part needs
    assert [p.status for p in parts] == ["skipped"] * 3 and all(p.message.startswith("no time left") for p in parts)
    assert parts[0].time_limit_s < 5


def test_deadline_ends_the_worker_and_marks_its_part(tmp_path, capsys):
    report = Report(tmp_path / "c.json", tmp_path / "c.md", SMOKE, "gpu-check.sh --smoke", 440)
    parts = plan(SMOKE, tmp_path, 440, skip=["quality"])
    parts[0].status, parts[0].started = "running", time.time()
    report.write(parts)  # as a worker leaves it while its first part runs
    pid_file = tmp_path / "worker.pid"
    code = supervise(report, time.time() + 1.0, ["sh", "-c", f"echo $$ > '{pid_file}'; exec sleep 60"])  # starts in ms
    assert code == 1
    with pytest.raises(ProcessLookupError):  # the worker was ended (and reaped), not left sleeping
        os.kill(int(pid_file.read_text()), 0)
    record = json.loads(report.json_path.read_text())
    statuses = [(p["name"], p["status"], p["message"]) for p in record["parts"]]
    assert statuses == [
        ("speed-fp32", "cut off", "the deadline ended the check"),
        ("speed-bf16", "skipped", "the deadline ended the check"),
        ("quality", "skipped", "--skip"),
    ]
    assert "- speed, fp32: cut off in" in report.markdown_path.read_text()
    assert "the deadline (440 s) ended the check" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--skip", "nope"], "unknown part 'nope' to skip; accepted: speed-fp32, speed-bf16, quality"),
        (["--deadline", "15"], "--deadline must be more than 20 seconds (kept to close the report), got 15"),
    ],
)
def test_bad_check_options_are_one_line_errors(argv, message, tmp_path, capsys):
    assert main(["--smoke", "--work-dir", str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_time_limit_leaves_methods_out_and_cuts_rounds():
    record = run_benchmark(BenchConfig(methods=["svfit"], base_model="tiny", resolution=32, steps=3, warmup=1, threads=1, time_limit=1e-3))
    assert record["skipped"] == ["svfit"] and [r["label"] for r in record["results"]] == ["none", "lora"]
    assert record["timed_rounds"] == {"train": 1, "inference": 1}
    assert all(len(r["train_s"]) == len(r["inference_s"]) == 1 for r in record["results"])
    text = markdown_section(record, None)
    assert "1 timed training and 1 inference steps per method (3 asked; 0.001 s time limit)" in text
    assert "Not measured within the time limit (0.001 s): svfit." in text


def test_time_limit_plans_rounds_from_the_ones_done():
    limit = TimeLimit(100.0, time.perf_counter())
    assert limit.another_training_round(0, 0.0)  # the first always runs
    one_more = 10.0 * (1 + 2 * INFERENCE_PER_TRAIN)  # one 10 s round done: another, then two inference rounds
    assert one_more < 99 and limit.another_training_round(1, 10.0)
    assert not limit.another_training_round(1, 30.0)
    assert limit.another_inference_round(0, 0.0) and not limit.another_inference_round(2, 400.0)
    assert limit.may_set_up(1) and TimeLimit(None, 0.0).may_set_up(20)
    assert not TimeLimit(1.0, time.perf_counter() - 0.7).may_set_up(2)  # 70% spent: past the set-up share


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--time-limit", "0"], "bench time limit must be a positive number of seconds, got 0.0"),
        (["--quality", "--quality-steps", "0"], "--quality-steps must be a positive integer, got 0"),
        (["--quality", "--sample-steps", "-1"], "--sample-steps must be a positive integer, got -1"),
    ],
)
def test_new_bench_options_refuse_bad_values(argv, message, capsys):
    assert cli_main(["bench", "--base-model", "tiny", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
