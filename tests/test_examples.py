"""The example scripts run end to end on the built-in tiny model (as subprocesses, as a user runs them, all three
started together), so they never rot; plus the DreamBench pieces that decide what to render (subjects,
adapters, grouping, resume) and the one-line errors, in process."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
# Smallest settings that still run every stage: 1-2 steps, no class images, no periodic samples.
FAST_TRAINING = "validation_every = 0\neval_timesteps = 1\ncheckpoint_every = 0\n"
TINY = ["--base-model", "tiny", "--embedders", "tiny", "--prior", "none", "--sample-steps", "1"]


def example(name: str):
    """The example script `name` imported as a module (its folder is where its shared helper lives)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """subjects/dog and subjects/my_mug with 3 photos each, and a TOML of fast training settings."""
    root = tmp_path_factory.mktemp("examples")
    rng = np.random.default_rng(0)
    for subject in ("dog", "my_mug"):
        (root / "subjects" / subject).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "subjects" / subject / f"{i}.png")
    (root / "fast.toml").write_text(FAST_TRAINING, encoding="utf-8")
    return root


class Run:
    """One example run in the background, its output in files (no pipe to fill up while tests wait)."""

    def __init__(self, name: str, args: list[str], cwd: Path, launcher: list[str] | None = None) -> None:
        self.command = (launcher or [sys.executable]) + args
        self.stdout_path, self.stderr_path = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(self.command, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)

    def finish(self) -> tuple[str, str]:
        """Wait for the run; (stdout, stderr) of a successful one, else a failure that shows them."""
        status = self.process.wait(timeout=600)
        stdout, stderr = self.stdout_path.read_text(), self.stderr_path.read_text()
        assert status == 0, f"{' '.join(self.command)}\nstdout:\n{stdout}\nstderr:\n{stderr[-4000:]}"
        return stdout, stderr

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the launcher and the workers it started
            self.process.wait()


@pytest.fixture(scope="module")
def launched(workspace: Path):
    """The first run of every example, started together: they are independent, so the tests wait for the
    slowest rather than for the sum. dreambench runs on two processes (sharding, DDP training)."""
    subjects, fast = workspace / "subjects", str(workspace / "fast.toml")
    runs = {
        "single": Run(
            "single",
            [
                str(EXAMPLES / "train_and_generate.py"),
                str(subjects / "dog"),
                "--class-noun",
                "dog",
                "--steps",
                "1",
                "--prompt",
                "a {token} {class_noun} on the beach",
                "--prompt",
                "a {token} {class_noun} in the snow",
                "--images-per-prompt",
                "1",
                "--output",
                str(workspace / "single"),
                "--train-config",
                fast,
                *TINY,
            ],
            workspace,
        ),
        "compare": Run(
            "compare",
            [
                str(EXAMPLES / "compare_adapters.py"),
                str(subjects / "dog"),
                "--methods",
                "lora,svfit",
                "--class-noun",
                "dog",
                "--steps",
                "2",
                "--prompt",
                "a {token} {class_noun}",
                "--images-per-prompt",
                "2",
                "--output",
                str(workspace / "compare"),
                "--train-config",
                fast,
                *TINY,
            ],
            workspace,
        ),
        "dreambench": Run(
            "dreambench",
            [*dreambench_args(workspace), "--methods", "lora", "--steps", "1", "--train-config", fast],
            workspace,
            launcher=[
                str(BIN / "accelerate"),
                "launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
            ],
        ),
    }
    yield runs
    for run in runs.values():
        run.stop()


def dreambench_args(workspace: Path) -> list[str]:
    return [
        str(EXAMPLES / "dreambench.py"),
        str(workspace / "subjects"),
        "--class-noun",
        "my_mug=mug",
        "--prompts-per-subject",
        "1",
        "--images-per-prompt",
        "2",
        "--output",
        str(workspace / "dreambench"),
        *TINY,
    ]


def read_manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


# --- the scripts, end to end --------------------------------------------------------------------------------


def test_train_and_generate(workspace: Path, launched) -> None:
    stdout, _ = launched["single"].finish()
    out = workspace / "single"
    assert (out / "train" / "adapter.safetensors").is_file()
    records = read_manifest(out / "images")
    assert [r["prompt"] for r in records] == ["a sks dog on the beach", "a sks dog in the snow"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report["metrics"]) == {"dino", "clip_i", "clip_t", "vendi"}
    assert report["run"]["methods"] == ["lora"]
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    assert "| lora | 1 | 3 | 2 |" in stdout  # the metrics table: 1 subject, 3 real, 2 generated
    assert str(out / "train" / "adapter.safetensors") in stdout


def test_compare_adapters(workspace: Path, launched) -> None:
    stdout, _ = launched["compare"].finish()
    out = workspace / "compare"
    for method in ("lora", "svfit"):
        result = json.loads((out / method / "train" / "result.json").read_text(encoding="utf-8"))
        assert result["steps_done"] == 2  # the same budget for every method
        assert len(read_manifest(out / method / "images")) == 2
    comparison = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert list(comparison) == ["lora", "svfit"]
    assert (out / "comparison.png").is_file()
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "trainable params" in summary and "train time" in summary
    rows = [line for line in summary.splitlines() if line.startswith(("| lora", "| svfit"))]
    assert len(rows) == 2 and all(line.count("|") == rows[0].count("|") for line in rows)
    assert summary.splitlines()[2].count("|") == rows[0].count("|")  # header and rows have the same columns
    assert "| svfit |" in stdout


def test_dreambench_two_processes_then_resume(workspace: Path, launched) -> None:
    stdout, stderr = launched["dreambench"].finish()
    out = workspace / "dreambench"
    assert "4 images in the benchmark, 0 already on disk, 4 to render on 2 process(es)" in stdout
    assert "generate [1/2]" in stderr and "generate [2/2]" in stderr  # both processes took a share
    images = out / "lora" / "images"
    records = read_manifest(images)
    assert sorted(r["file"] for r in records) == ["dog/00_0.png", "dog/00_1.png", "my_mug/00_0.png", "my_mug/00_1.png"]
    assert {r["prompt"] for r in records} == {"a sks dog in the jungle", "a sks mug in the jungle"}
    assert [r["seed"] for r in records] == [0, 1, 0, 1]
    report = json.loads((out / "lora" / "report.json").read_text(encoding="utf-8"))
    assert set(report["subjects"]) == {"dog", "my_mug"}
    assert (out / "comparison.md").is_file() and (out / "lora" / "report.png").is_file()

    # Rerun on the trained adapters: nothing new except the image that was cut short.
    mtimes = {p: p.stat().st_mtime_ns for p in images.rglob("*.png")}
    broken = images / "my_mug" / "00_1.png"
    broken.write_bytes(broken.read_bytes()[:200])
    stdout, _ = Run("dreambench-resume", [*dreambench_args(workspace), "--adapters", str(out / "lora" / "adapters")], workspace).finish()
    assert "4 images in the benchmark, 3 already on disk, 1 to render on 1 process(es)" in stdout
    changed = [p for p, mtime in mtimes.items() if p.stat().st_mtime_ns != mtime]
    assert changed == [broken]
    with Image.open(broken) as image:
        image.load()
    assert len(read_manifest(images)) == 4


# --- DreamBench pieces and errors, in process ---------------------------------------------------------------


def test_dreambench_subjects_need_a_class_noun(workspace: Path, capsys) -> None:
    dreambench = example("dreambench")
    subjects = dreambench.read_subjects(workspace / "subjects", {"my_mug": "mug"})
    assert [(s.name, s.class_noun, s.live) for s in subjects] == [("dog", "dog", True), ("my_mug", "mug", False)]
    assert dreambench.subject_prompts(subjects[0], "sks", 2) == ["a sks dog in the jungle", "a sks dog in the snow"]
    assert len(dreambench.subject_prompts(subjects[1], "zwx", 25)) == 25

    status = dreambench.main([str(workspace / "subjects"), "--methods", "lora", "--output", str(workspace / "x")])
    error = capsys.readouterr().err
    assert status == 2 and error.startswith("error: ") and error.count("\n") == 1
    assert "my_mug" in error and "--class-noun" in error
    assert dreambench.main([str(workspace / "subjects"), "--methods", "lora", "--class-noun", "cat=cat"]) == 2
    assert "cat" in capsys.readouterr().err
    assert dreambench.main([str(workspace / "subjects"), "--methods", "nope", "--class-noun", "my_mug=mug"]) == 2
    assert "unknown method(s) 'nope'" in capsys.readouterr().err
    assert (
        dreambench.main([str(workspace / "subjects"), "--methods", "lora", "--class-noun", "my_mug=mug", "--prompts-per-subject", "26"])
        == 2
    )
    assert "--prompts-per-subject must be between 1 and 25, got 26" in capsys.readouterr().err


def test_dreambench_finds_adapters_by_layout(workspace: Path, launched, tmp_path: Path) -> None:
    launched["compare"].finish()  # its lora and svfit adapters
    dreambench = example("dreambench")
    from personalize.errors import UserError

    trained = {m: workspace / "compare" / m / "train" / "adapter.safetensors" for m in ("lora", "svfit")}
    (tmp_path / "svfit").mkdir()
    shutil.copy(trained["svfit"], tmp_path / "svfit" / "dog.safetensors")
    (tmp_path / "lora" / "my_mug").mkdir(parents=True)
    shutil.copy(trained["lora"], tmp_path / "lora" / "my_mug" / "adapter.safetensors")
    shutil.copy(trained["svfit"], tmp_path / "other.safetensors")
    subjects = dreambench.read_subjects(workspace / "subjects", {"my_mug": "mug"})
    runs = dreambench.collect_adapters(
        [str(tmp_path / "svfit"), str(tmp_path / "lora" / "my_mug" / "adapter.safetensors"), f"my_mug={tmp_path / 'other.safetensors'}"],
        subjects,
    )
    assert runs == {
        "svfit": {"dog": tmp_path / "svfit" / "dog.safetensors", "my_mug": tmp_path / "other.safetensors"},
        "lora": {"my_mug": tmp_path / "lora" / "my_mug" / "adapter.safetensors"},
    }
    with pytest.raises(UserError, match="cannot tell which subject"):
        dreambench.collect_adapters([str(tmp_path / "other.safetensors")], subjects)
    with pytest.raises(UserError, match="two svfit adapters for subject 'dog'"):
        dreambench.collect_adapters([str(tmp_path / "svfit"), f"dog={tmp_path / 'other.safetensors'}"], subjects)
    with pytest.raises(UserError, match="no adapter for any subject"):
        dreambench.collect_adapters([str(tmp_path)], subjects)


def test_render_groups_and_resume_check(tmp_path: Path) -> None:
    dreambench = example("dreambench")
    from personalize.generate import GeneratedImage

    def job(run: str, prompt: int, image: int, seed_offset: int = 0):
        return dreambench.Job(run, "dog", prompt, image, f"prompt {prompt}", image + seed_offset, "a.safetensors", "tiny", 2, 7.5)

    jobs = [
        job("lora", 0, 0),
        job("lora", 0, 1),
        job("lora", 0, 3),
        job("lora", 1, 0),
        job("lora", 1, 1),
        job("lora", 1, 2),
        job("svfit", 1, 3),
    ]
    groups = dreambench.render_groups(jobs, batch_size=2)
    assert [[(j.run, j.prompt_index, j.image_index) for j in g] for g in groups] == [
        [("lora", 0, 0), ("lora", 0, 1)],
        [("lora", 0, 3)],
        [("lora", 1, 0), ("lora", 1, 1)],
        [("lora", 1, 2)],
        [("svfit", 1, 3)],
    ]

    done = job("lora", 0, 1)
    item = GeneratedImage(Image.new("RGB", (64, 64), (9, 9, 9)), None, done.prompt, "", done.seed, 2, 7.5, "tiny")
    dreambench.save_image(item, done, tmp_path)
    path = tmp_path / done.file
    assert dreambench.is_done(path, done)
    assert not dreambench.is_done(path, job("lora", 0, 1, seed_offset=5))  # rendered for another seed
    assert not dreambench.is_done(tmp_path / "missing.png", done)
    path.write_bytes(path.read_bytes()[:-30])  # cut short: the pixel data no longer decodes
    assert not dreambench.is_done(path, done)


def test_examples_report_bad_input_in_one_line(workspace: Path, capsys) -> None:
    compare = example("compare_adapters")
    single = example("train_and_generate")
    assert compare.main([str(workspace / "subjects" / "dog"), "--methods", "lora,bogus", "--output", str(workspace / "bad")]) == 2
    assert "unknown method(s) 'bogus'" in capsys.readouterr().err
    missing = workspace / "no_such_folder"
    assert single.main([str(missing), "--base-model", "tiny", "--output", str(workspace / "bad2")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(missing) in error and error.count("\n") == 1
    (workspace / "used").mkdir()
    (workspace / "used" / "file.txt").write_text("x")
    assert single.main([str(workspace / "subjects" / "dog"), "--output", str(workspace / "used")]) == 2
    assert "--overwrite" in capsys.readouterr().err
