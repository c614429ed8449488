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
