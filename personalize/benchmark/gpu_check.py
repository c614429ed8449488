"""The GPU check behind `benchmarks/gpu-check.sh`: one command for a session lent a GPU, done within a
deadline (under 8 minutes with the script's own set-up), leaving a JSON record and a Markdown section
for BENCHMARKS.md.

Parts, each one `personalize bench` call (its own options, its own record):
- `speed-fp16`, `speed-bf16`: every adapter method on `sd15-random` (SD 1.5's UNet, random weights) at
  512 px, frozen weights stored in the precision and autocast in it (the trainer's mixed precision):
  train step vs LoRA, peak memory over the frozen UNet (CUDA allocator), cold and warm attach, merged
  inference. The methods the issue tracks go first, so a cut by the time limit drops the others.
- `quality`: `bench --quality` on `shapes`, LoRA with its recommended preset and svfit on one concept.

Time: the deadline is shared out (`SHARES`); a speed part's `--time-limit` is what is left less the later
parts' shares, so time one part leaves unused goes to the next. A supervising process ends the worker
that runs the parts before the deadline, then marks what was cut off; the JSON and Markdown are
rewritten before and after every part, so a run that is cut off still leaves every finished part.
With the default 440 s: about 140 s per speed part, 126 s kept for the quality part. Not yet measured on
a GPU; the estimate for an H100: a speed part's model load 10-20 s, set-up (cold SVDs of svfit and frod,
warm-up steps) 40-80 s, then 10 rounds of ~0.1 s training and ~0.2 s inference work per method, ~45 s;
the quality part 300 steps of the 1.5M-parameter `shapes` UNet per method, ~60-90 s with its renders.
A slower machine loses methods (from the end of the order: the peft baselines first) and rounds, not the deadline.

`--smoke` runs the same parts on the CPU at toy sizes (tiny model, 32 px, fp32 and bf16, the floor and
LoRA, one timed round; a 2-step quality run of one method): the test suite runs it, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic, write_text_atomic
from ..errors import USER_ERRORS, UserError, user_message

SCRIPT = "benchmarks/gpu-check.sh"
DEADLINE_S = 440.0  # the Python run; the script's wheel install and import check add about 20 s: under 8 minutes
FINISH_S = 20.0  # kept from the deadline: ending the worker and rewriting the report after it
SHARES = {"speed": 0.7, "quality": 0.3}  # of the deadline less FINISH_S; the speed share split evenly between precisions
MIN_LIMIT_S = 30.0  # a speed part given less than this (or less than a fifth of its share) is skipped
# Measured first, so a cut by the time limit drops the others: the methods issue 30 tracks, then the peft baselines.
PRIORITY = ("svfit", "frod", "atoms", "filter_atoms", "kron_atoms", "loldu", "aoft")
QUALITY_METHODS = ("lora:preset=attention_convs", "svfit")  # LoRA with the shapes recipe's preset, and a seed method
QUALITY_CONCEPT = "pink-heart"  # the demo concept (shapes/recipe.py)


@dataclass(frozen=True)
class Mode:
    """Sizes of one kind of run: the GPU check itself, or its CPU smoke version."""

    name: str
    device: str
    base_model: str
    resolution: int
    precisions: tuple[str, ...]
    methods: tuple[str, ...] | None  # None: every registered method (PRIORITY first); the floor and LoRA always run
    quality_methods: tuple[str, ...] = QUALITY_METHODS
    speed_options: tuple[str, ...] = ()
    quality_options: tuple[str, ...] = ()


FULL = Mode("full", "cuda", "sd15-random", 512, ("fp16", "bf16"), None, quality_options=("--base-images", "0"))
SMOKE = Mode(
    "smoke",
    "cpu",
    "tiny",
    32,
    ("fp32", "bf16"),
    ("lora",),
    QUALITY_METHODS[:1],
    speed_options=("--steps", "1", "--warmup", "1", "--threads", "1", "--forms", "model"),
    quality_options=("--base-images", "0", "--quality-steps", "2", "--sample-steps", "2", "--threads", "1"),
)


@dataclass
class Part:
    """One `personalize bench` call of the check and what became of it."""

    name: str
    title: str
    argv: list[str]  # `personalize` arguments, less --output and --time-limit
    output: str  # the record the call writes
    share_s: float  # its share of the deadline
    elastic: bool  # a speed part: takes a --time-limit
    status: str = "pending"  # pending | running | done | failed | skipped | cut off
    started: float | None = None  # time.time() when it began
    seconds: float = 0.0
    time_limit_s: float | None = None
    message: str = ""
    record: dict[str, Any] | None = None
    command: str = ""

    def finish(self, status: str, message: str = "") -> None:
        self.status, self.message = status, message
        self.seconds = round(time.time() - (self.started or time.time()), 1)


def ordered_methods(names: list[str]) -> list[str]:
    """`names` less the LoRA reference (always measured), PRIORITY's first, then the rest in their order."""
    rest = [n for n in names if n != "lora"]
    return [n for n in PRIORITY if n in rest] + [n for n in rest if n not in PRIORITY]


def plan(mode: Mode, work_dir: Path, deadline_s: float, skip: list[str]) -> list[Part]:
    from ..adapters import method_names

    budget = max(deadline_s - FINISH_S, 0.0)
    methods = list(mode.methods) if mode.methods is not None else ordered_methods(list(method_names()))
    parts = []
    for precision in mode.precisions:
        argv = ["bench", "--base-model", mode.base_model, "--resolution", str(mode.resolution), "--device", mode.device]
        argv += ["--precision", precision, "--methods", *methods, *mode.speed_options, "--markdown", "", "--chart", ""]
        title = f"speed, {precision}"
        share = budget * SHARES["speed"] / len(mode.precisions)
        parts.append(Part(f"speed-{precision}", title, argv, str(work_dir / f"speed-{precision}.json"), share, elastic=True))
    argv = ["bench", "--quality", "--methods", *mode.quality_methods, "--concepts", QUALITY_CONCEPT, *mode.quality_options]
    argv += ["--quality-dir", str(work_dir / "quality"), "--markdown", ""]
    parts.append(Part("quality", "quality on `shapes`", argv, str(work_dir / "quality.json"), budget * SHARES["quality"], elastic=False))
    names = [p.name for p in parts]
    for name in skip:
        if name not in names:
            raise UserError(f"unknown part '{name}' to skip; accepted: {', '.join(names)}")
    for part in parts:
        part.command = shlex.join(["personalize", *part.argv])
        if part.name in skip:
            part.status, part.message = "skipped", "--skip"
    return parts


# --- the worker: runs the parts in this process -------------------------------------------------


def run_parts(parts: list[Part], until: float, report: Report) -> None:
    """Run each pending part while time is left before `until` (a time.time() reading), rewriting the report around each."""
    for index, part in enumerate(parts):
        if part.status != "pending":
            continue
        later = sum(p.share_s for p in parts[index + 1 :] if p.status == "pending")
        left = until - time.time()
        if part.elastic:
            part.time_limit_s = round(left - later, 1)
            if part.time_limit_s < max(MIN_LIMIT_S, part.share_s / 5):
                part.status, part.message = "skipped", f"no time left ({max(left, 0):.0f} s to the deadline)"
                continue
        elif left < part.share_s / 3:
            part.status, part.message = "skipped", f"no time left ({max(left, 0):.0f} s to the deadline)"
            continue
        part.status, part.started = "running", time.time()
        report.write(parts)
        print(f"gpu-check: {part.name}" + (f" (time limit {part.time_limit_s:.0f} s)" if part.elastic else ""), file=sys.stderr, flush=True)
        run_part(part)
        print(f"gpu-check: {part.name} {part.status} in {part.seconds:.0f} s {part.message}".rstrip(), file=sys.stderr, flush=True)
        report.write(parts)


def run_part(part: Part) -> None:
    """One `personalize bench` call in this process; a failure is recorded and the check goes on."""
    from ..commands import bench

    parser = argparse.ArgumentParser(prog="personalize bench")
    bench.add_arguments(parser)
    argv = [*part.argv, "--output", part.output]
    if part.time_limit_s is not None:
        argv += ["--time-limit", f"{part.time_limit_s:g}"]
    part.command = shlex.join(["personalize", *argv])
    try:
        bench.run(parser.parse_args(argv[1:]))  # argv[0] is the subcommand, `bench`
        part.record = json.loads(Path(part.output).read_text())
        part.record["command"] = part.command
        part.finish("done")
    except USER_ERRORS as exc:
        part.finish("failed", user_message(exc))
    except SystemExit as exc:  # argparse refused the arguments this module built
        part.finish("failed", f"personalize bench refused its arguments (exit status {exc.code})")
    except Exception as exc:  # an unexpected failure (a GPU out of memory, a library's bug): recorded, the next part runs
        traceback.print_exc()
        part.finish("failed", f"{type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        _free_device_memory()


def _free_device_memory() -> None:
    """Give the CUDA allocator's cache back between parts, so each part's peak starts from the same place."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the report ----------------------------------------------------------------------------------


@dataclass
class Report:
    """The JSON record and the Markdown section of one check."""

    json_path: Path
    markdown_path: Path
    mode: Mode
    command: str
    deadline_s: float
    began: float = field(default_factory=time.time)

    def record(self, parts: list[Part]) -> dict[str, Any]:
        return {
            "format": "personalize.gpu-check",
            "version": 1,
            "mode": self.mode.name,
            "settings": asdict(self.mode),
            "command": self.command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.began)),
            "deadline_s": self.deadline_s,
            "total_s": round(time.time() - self.began, 1),
            "environment": _environment(parts),
            "summary": summary_rows(parts),
            "parts": [asdict(p) for p in parts],
        }

    def write(self, parts: list[Part]) -> None:
        record = self.record(parts)
        write_json_atomic(self.json_path, record)
        write_text_atomic(self.markdown_path, markdown(record))


def _speed_parts(parts: list[Part]) -> list[Part]:
    return [p for p in parts if p.elastic and p.record is not None]


def _environment(parts: list[Part]) -> dict[str, Any] | None:
    done = _speed_parts(parts)
    return done[0].record["environment"] if done else None  # type: ignore[index]


def summary_rows(parts: list[Part]) -> list[dict[str, Any]]:
    """One row per method measured in any speed part: per precision its step, ratio to LoRA and peak
    memory; attach and merged inference from the first precision that measured it."""
    rows: dict[str, dict[str, Any]] = {}
    for part in _speed_parts(parts):
        precision = part.name.removeprefix("speed-")
        for r in part.record["results"]:  # type: ignore[index]
            row = rows.setdefault(r["label"], {"method": r["label"], "trainable": r["trainable"], "precisions": {}})
            row["precisions"][precision] = {
                "train_step_s": r["train_median_s"],
                "vs_lora": r["train_ratio_lora"],
                "peak_memory_mb": r["memory_mb"],
            }
            if "attach_s" not in row:
                row |= {
                    "attach_s": r["attach_s"],
                    "attach_warm_s": r["attach_warm_s"],
                    "merged_inference_s": r["inference_median_s"],
                    "inference_vs_base": r["inference_ratio_base"],
                    "measured_in": precision,
                }
    return list(rows.values())


def _status_line(part: dict[str, Any]) -> str:
    text = f"{part['title']}: {part['status']}"
    if part["status"] in ("done", "failed", "cut off"):
        text += f" in {part['seconds']:.0f} s"
    rounds = (part.get("record") or {}).get("timed_rounds")
    if rounds:
        text += f", {rounds['train']} training / {rounds['inference']} inference rounds"
    skipped = (part.get("record") or {}).get("skipped")
    if skipped:
        text += f", not measured within its time limit: {', '.join(skipped)}"
    return text + (f" ({part['message']})" if part["message"] else "")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def summary_table(record: dict[str, Any]) -> str:
    rows = record["summary"]
    precisions = [p["name"].removeprefix("speed-") for p in record["parts"] if p["elastic"] and p["record"]]
    if not rows:
        return ""
    head = "| Method | Trainable |" + "".join(f" {p} step (ms) | vs LoRA |" for p in precisions)
    head += f" Peak memory {' / '.join(precisions)} (MB) | Attach cold / warm (s) | Merged infer. (ms) | vs base |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(precisions) + "---:|---:|---:|---:|"]
    for row in rows:
        cells = [row["method"], f"{row['trainable']:,}"]
        for precision in precisions:
            values = row["precisions"].get(precision)
            cells += [_ms(values["train_step_s"]), f"{values['vs_lora']:.2f}"] if values else ["-", "-"]
        memory = [row["precisions"].get(p, {}).get("peak_memory_mb") for p in precisions]
        cells.append(" / ".join("-" if m is None else f"{m:,.0f}" for m in memory))
        floor = row["method"] == "none"
        cells.append("-" if floor else f"{row['attach_s']:.2f} / {row['attach_warm_s']:.2f}")
        cells += [_ms(row["merged_inference_s"]), f"{row['inference_vs_base']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _demoted(text: str) -> str:
    """A section's headings one level down, to nest under the check's own heading."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def section_key(record: dict[str, Any]) -> str:
    s = record["settings"]
    return f"gpu-check-{s['device']}-{s['resolution']}px-{s['base_model']}"


def markdown(record: dict[str, Any]) -> str:
    """The check's section: what ran, a summary table across precisions, then each part's own tables."""
    from .quality import markdown as quality_markdown
    from .report import markdown_section

    env = record["environment"]
    machine = "no speed part finished, so the machine is not recorded"
    if env:
        gpu = f"{env['device_name']} ({env.get('gpu_memory_gb', '?')} GB, CUDA {env.get('cuda')}), host " if env["device"] == "cuda" else ""
        machine = (
            f"{gpu}{env['cpu']} ({env['cpu_count']} CPUs); torch {env['torch']}, diffusers {env['diffusers']}, "
            f"peft {env['peft']}, Python {env['python']}"
        )
    s = record["settings"]
    speed = [p for p in record["parts"] if p["elastic"] and p["record"]]
    at_rest = ", ".join(f"{p['name'].removeprefix('speed-')} {p['record']['base_memory_mb']:,.0f} MB" for p in speed)
    lines = [
        f"### GPU check{' (CPU smoke run)' if record['mode'] == 'smoke' else ''}: {env['device_name'] if env else s['device']}, "
        f"`{s['base_model']}` at {s['resolution']} px in {' and '.join(s['precisions'])}",
        "",
        f"Command: `{record['command']}` ({record['created']}, {record['total_s']:.0f} s of a {record['deadline_s']:.0f} s deadline). "
        f"Machine: {machine}.",
        "",
        *[f"- {_status_line(p)}" for p in record["parts"]],
    ]
    table = summary_table(record)
    if table:
        lines += [
            "",
            "Training step: forward, MSE, backward and AdamW on one image, frozen weights stored in the precision and "
            "autocast in it, as the trainer's mixed precision; medians over the rounds, **vs LoRA** the median of per-round "
            "ratios to LoRA r=4 timed in the same round. Peak memory: the CUDA allocator's peak during a training step "
            f"(resident set on a CPU) over the frozen UNet at rest (in use at rest: {at_rest}). Attach and merged inference (one UNet "
            "forward with the adapter merged, vs the base UNet timed just before it) from the first precision measured.",
            "",
            table,
        ]
    for part in record["parts"]:
        if part["record"] is None:
            continue
        if part["elastic"]:
            lines += ["", _demoted(markdown_section(part["record"], None))]
        else:
            settings = part["record"]["settings"]
            lines += [
                "",
                f"#### Quality on `shapes` ({record['settings']['device'].upper()}, the trainer's default precision), "
                f"{', '.join(settings['concepts'])}: {settings['steps']} training steps per method",
                "",
                f"Command: `{part['command']}` ({part['seconds']:.0f} s)",
                "",
                quality_markdown(part["record"]),
            ]
    key = section_key(record)
    return f"<!-- bench:{key}:start -->\n" + "\n".join(lines) + f"\n<!-- bench:{key}:end -->\n"


# --- the supervisor and the command line -----------------------------------------------------------


def close_unfinished(report: Report, status: str, reason: str) -> None:
    """After the worker ended early: its running part gets `status` ("cut off", "failed"), pending parts
    are skipped, both with `reason`; the report is rewritten."""
    parts = [Part(**p) for p in json.loads(report.json_path.read_text())["parts"]]
    for part in parts:
        if part.status == "running":
            part.finish(status, reason)
        elif part.status == "pending":
            part.status, part.message = "skipped", reason
    report.write(parts)


def worker_command(argv: list[str], until: float) -> list[str]:
    """This module again, told to run the parts itself until `until` (a time.time() reading)."""
    return [sys.executable, "-m", "personalize.benchmark.gpu_check", *argv, "--worker-until", repr(until)]


def supervise(report: Report, until: float, command: list[str]) -> int:
    """Run the worker `command` and end it at `until` (FINISH_S before the deadline); its exit status, or
    1 when a part did not finish. The worker stays in this process group, so a Ctrl-C or a kill of the
    group reaches it too."""
    worker = subprocess.Popen(command)
    try:
        code = worker.wait(timeout=max(until - time.time(), 0.0))
        if code:
            close_unfinished(report, "failed", f"the worker process ended with exit status {code}")
    except subprocess.TimeoutExpired:
        _end(worker)
        print(f"gpu-check: the deadline ({report.deadline_s:.0f} s) ended the check", file=sys.stderr, flush=True)
        code = 1
        close_unfinished(report, "cut off", "the deadline ended the check")
    except KeyboardInterrupt:
        _end(worker)
        close_unfinished(report, "cut off", "interrupted")
        return 130
    record = json.loads(report.json_path.read_text())
    print(f"gpu-check: wrote {report.json_path} and {report.markdown_path} ({record['total_s']:.0f} s)")
    ok = all(p["status"] == "done" or p["message"] == "--skip" for p in record["parts"])
    return code if code else (0 if ok else 1)


def _end(worker: subprocess.Popen) -> None:
    """Stop the worker: asked first, then killed (it starts no processes of its own)."""
    worker.terminate()
    try:
        worker.wait(timeout=5)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the same parts on the CPU at toy sizes (what the test suite runs)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole check (default: %(default)g)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PART", help="parts not to run: speed-fp16, speed-bf16, quality")
    parser.add_argument("--json", help="the record (default: benchmarks/gpu-check.json; with --smoke in the work folder)")
    parser.add_argument("--markdown", help="the BENCHMARKS.md section (default: benchmarks/gpu-check.md; with --smoke in the work folder)")
    parser.add_argument("--work-dir", help="each part's record and the quality run's files (default: outputs/gpu-check[-smoke])")
    parser.add_argument("--worker-until", type=float, help=argparse.SUPPRESS)  # set by the supervisor for its worker
    args = parser.parse_args(argv)
    if not args.deadline > FINISH_S:
        raise UserError(f"--deadline must be more than {FINISH_S:g} seconds (kept to close the report), got {args.deadline:g}")
    suffix = "-smoke" if args.smoke else ""
    args.work_dir = Path(args.work_dir or f"outputs/gpu-check{suffix}")
    args.json = Path(args.json or (args.work_dir / "gpu-check.json" if args.smoke else "benchmarks/gpu-check.json"))
    args.markdown = Path(args.markdown or (args.work_dir / "gpu-check.md" if args.smoke else "benchmarks/gpu-check.md"))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        mode = SMOKE if args.smoke else FULL
        worker = args.worker_until is not None
        user_argv = argv[: argv.index("--worker-until")] if worker else argv
        report = Report(args.json, args.markdown, mode, shlex.join([SCRIPT, *user_argv]), args.deadline)
        parts = plan(mode, args.work_dir, args.deadline, args.skip)  # an unknown --skip fails here
        if not worker:  # the supervisor: writes the plan (no earlier run's record is left), hands it to a worker, ends it in time
            if mode.device == "cuda":
                _check_cuda()
            report.write(parts)
            until = report.began + args.deadline - FINISH_S
            return supervise(report, until, worker_command(argv, until))
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        report.began = args.worker_until + FINISH_S - args.deadline  # the supervisor's start
        run_parts(parts, args.worker_until, report)
        return 0
    except USER_ERRORS as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2


def _check_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("the GPU check needs a CUDA GPU and none is visible to torch; run with --smoke for the CPU version")


if __name__ == "__main__":
    sys.exit(main())
