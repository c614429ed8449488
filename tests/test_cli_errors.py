"""User errors: one list for the CLI, the examples and the app; OS errors as one line naming the path."""

from __future__ import annotations

import errno

import pytest

from personalize.errors import USER_ERRORS, UserError, user_message


@pytest.mark.parametrize(
    "error, expected",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/srv/out"), "'/srv/out': permission denied; choose a location"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), "'/mnt/ro/out': the file system is read-only; choose"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/file.txt/out"), "'/x/file.txt/out': a part of this path is a file"),
        (FileExistsError(errno.EEXIST, "File exists", "/x/out"), "'/x/out': a file of that name already exists"),
        (UserError("steps must be a positive integer, got 0"), "steps must be a positive integer, got 0"),
        (OSError("We couldn't connect to the hub"), "We couldn't connect to the hub"),
    ],
)
def test_user_message_is_one_line_naming_the_path(error, expected):
    assert isinstance(error, USER_ERRORS)
    message = user_message(error)
    assert message.startswith(expected) and "\n" not in message and "Errno" not in message


def test_front_ends_share_the_one_list():
    import app.feedback
    import examples._common
    import personalize.cli

    assert personalize.cli.USER_ERRORS is USER_ERRORS
    assert examples._common.USER_ERRORS is USER_ERRORS
    assert app.feedback.USER_ERRORS is USER_ERRORS
    assert app.feedback.message_of(PermissionError(errno.EACCES, "Permission denied", "/srv/out")).startswith("'/srv/out'")


# --- OS errors and inputs: checked before any model loads, one line, no empty folder left behind ---------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a base model is loaded: these errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("personalize.training.trainer.load_pipeline", refuse)
    monkeypatch.setattr("personalize.models.load_pipeline", refuse)  # what `personalize generate` loads with


def cli_error(capsys, argv: list[str]) -> str:
    from personalize.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Errno" not in err[0], err
    return err[0]


def train_argv(photos, output) -> list[str]:
    return [
        "train",
        "--instance-images",
        str(photos),
        "--output-dir",
        str(output),
        "--base-model",
        "tiny",
        "--prior",
        "none",
        "--steps",
        "2",
    ]


@pytest.fixture
def photos(tmp_path):
    from tests.test_training.conftest import make_photos

    make_photos(tmp_path / "photos", count=2)
    return tmp_path / "photos"


def test_train_output_below_a_file(tmp_path, photos, capsys, no_model):
    (tmp_path / "file.txt").write_text("x")
    line = cli_error(capsys, train_argv(photos, tmp_path / "file.txt" / "out"))
    assert "output_dir" in line and "file.txt" in line and "not a folder" in line


def test_train_read_only_output_fails_before_loading_and_leaves_nothing(tmp_path, photos, capsys, monkeypatch, no_model):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr("personalize.atomic.tempfile.TemporaryFile", read_only)
    line = cli_error(capsys, train_argv(photos, tmp_path / "new" / "out"))
    assert "output_dir" in line and "read-only" in line and "writable disk" in line
    assert not (tmp_path / "new").exists()


def test_train_failing_after_creating_its_folder_removes_it(tmp_path, photos, capsys, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("base model 'nowhere' cannot be reached")

    monkeypatch.setattr("personalize.training.trainer.load_pipeline", unreachable)
    assert "cannot be reached" in cli_error(capsys, train_argv(photos, tmp_path / "a" / "out"))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("seed, count", [(2**64, 1), (-1, 1), (2**32 - 2, 4)])
def test_generate_refuses_seeds_out_of_range(tmp_path, capsys, no_model, seed, count):
    line = cli_error(
        capsys,
        [
            "generate",
            "--base-model",
            "tiny",
            "--prompt",
            "a dog",
            "--seed",
            str(seed),
            "--num-images",
            str(count),
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert "seed must be an integer from 0 to" in line
    assert not (tmp_path / "out").exists()


def test_generate_refuses_unknown_placeholders(tmp_path, capsys, no_model):
    line = cli_error(capsys, ["generate", "--base-model", "tiny", "--prompt", "a photo of {tokn} dog", "--output", str(tmp_path / "out")])
    assert "unknown placeholder {tokn}" in line and "{token}" in line
    assert not (tmp_path / "out").exists()


def test_generate_failing_after_creating_its_folder_removes_it(tmp_path, capsys, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("base model 'nowhere' cannot be reached")

    monkeypatch.setattr("personalize.models.load_pipeline", unreachable)
    cli_error(capsys, ["generate", "--base-model", "tiny", "--prompt", "a dog", "--output", str(tmp_path / "x" / "out")])
    assert not (tmp_path / "x").exists()


def test_generate_api_checks_prompts_and_seeds_before_rendering():
    from personalize.generate import generate

    with pytest.raises(UserError, match=r"unknown placeholder \{subject\}"):
        generate("tiny", "a photo of {subject}")
    with pytest.raises(UserError, match="seed must be an integer from 0 to"):
        generate("tiny", "a photo", seed=2**64)


# --- --device: one check (personalize.models.resolve_device) for every command that takes it -------------


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA or MPS: the same answers on every test machine."""
    import torch._dynamo  # noqa: F401  (its import reads torch.cuda.is_available.__wrapped__: import it before the patch)

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)


def device_argv(command: str, tmp_path, photos) -> list[str]:
    """`command` with valid arguments apart from --device, writing (if it ever got that far) under tmp_path/out."""
    if command == "masks":
        return ["masks", str(photos), "--class-noun", "dog", "--mask-model", "tiny"]
    if command == "bench":
        out = tmp_path / "out"
        return ["bench", "--methods", "lora", "--base-model", "tiny", "--output", str(out / "b.json"), "--markdown", "", "--chart", ""]
    import personalize as P
    from personalize.models import tiny_unet

    adapter = tmp_path / "adapter.safetensors"
    P.attach(tiny_unet("sd1"), "lora").save(str(adapter))
    return ["export", "--adapter", str(adapter), "--output", str(tmp_path / "out" / "lora.safetensors")]


@pytest.mark.parametrize("command", ["masks", "bench", "export"])
@pytest.mark.parametrize(
    "device, message",
    [
        ("toaster", "unknown device 'toaster'; accepted: cpu, cuda, cuda:N or mps (available here: cpu)"),
        ("cuda", "device 'cuda': cuda requested but no CUDA GPU is available (available here: cpu)"),
        ("cuda:1", "device 'cuda:1': cuda requested but no CUDA GPU is available (available here: cpu)"),
        ("mps", "device 'mps': mps requested but Apple MPS is not available (available here: cpu)"),
        ("meta", "device 'meta' is not supported; accepted: cpu, cuda, cuda:N or mps (available here: cpu)"),
    ],
)
def test_every_device_flag_is_one_line_naming_the_value(command, device, message, tmp_path, photos, capsys, no_gpu):
    line = cli_error(capsys, [*device_argv(command, tmp_path, photos), "--device", device])
    assert line == f"error: {message}"
    assert not (tmp_path / "out").exists()
    assert not list(photos.glob("*.mask.png"))


def test_device_names_a_gpu_this_machine_has(monkeypatch):
    import torch

    from personalize.models import resolve_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert resolve_device(" CUDA:1 ") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"^device 'cuda:2': this machine has no CUDA GPU 2 \(available here: cpu, cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_train_resume_errors_are_one_line_and_write_nothing(tmp_path, photos, capsys):
    """A checkpoint whose random state is a pickle with code in it, and a total below the checkpoint's step."""
    from tests.test_training.test_train_resume import evil_pickle

    out = tmp_path / "out"
    assert main_ok(train_argv(photos, out) + ["--checkpoint-every", "1", "--validation-every", "0", "--resolution", "32"])
    config = (out / "config.json").read_text()
    capsys.readouterr()  # the run's progress bars
    line = cli_error(capsys, train_argv(photos, out) + ["--resume", "--steps", "1", "--resolution", "32"])
    assert "with steps 1: its checkpoint step_000002 is at step 2; set steps to 2 or more" in line
    for checkpoint in (out / "checkpoints").iterdir():
        evil_pickle(checkpoint / "rng_0.pt")
    line = cli_error(capsys, train_argv(photos, out) + ["--resume", "--steps", "3", "--resolution", "32"])
    assert f"checkpoint file '{out / 'checkpoints' / 'step_000002' / 'rng_0.pt'}' is damaged" in line and "weights_only" not in line
    assert (out / "config.json").read_text() == config


def main_ok(argv: list[str]) -> bool:
    from personalize.cli import main

    return main(argv) == 0
