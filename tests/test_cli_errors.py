"""User errors: one list for the CLI, the examples and the app; OS errors as one line naming the path."""

from __future__ import annotations

import errno

import pytest

from personalize.errors import USER_ERRORS, UserError, user_message


@pytest.mark.parametrize("error, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/srv/out"), "'/srv/out': permission denied; choose a location"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), "'/mnt/ro/out': the file system is read-only; choose"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/file.txt/out"), "'/x/file.txt/out': a part of this path is a file"),
    (FileExistsError(errno.EEXIST, "File exists", "/x/out"), "'/x/out': a file of that name already exists"),
    (UserError("steps must be a positive integer, got 0"), "steps must be a positive integer, got 0"),
    (OSError("We couldn't connect to the hub"), "We couldn't connect to the hub"),
])
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
