"""User-facing errors: raised where bad input enters, shown as one line by the CLI, the examples and the app.

`USER_ERRORS` is the one list of exception types every front end treats as the user's to fix (no
traceback); `user_message` turns one of them into that line. Operating-system errors name the path
and what to do instead of the bare errno text ("[Errno 30] Read-only file system").
"""

from __future__ import annotations

import errno
import os

# What to do about an OSError, by errno; the line names the path before it.
OS_ADVICE = {
    errno.EACCES: "permission denied; choose a location you can write to, or change its permissions",
    errno.EPERM: "operation not permitted; choose a location you can write to, or change its permissions",
    errno.EROFS: "the file system is read-only; choose a location on a writable disk",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EEXIST: "a file of that name already exists; remove it or choose another path",
    errno.EISDIR: "this is a folder, not a file; give a file path",
    errno.ENOENT: "it does not exist; check the path",
    errno.ENOSPC: "the disk is full; free some space or choose another disk",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another disk",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}


class UserError(ValueError):
    """A problem with what the user asked for; the message names the bad value and what is accepted."""


# ValueError: bad values found by libraries the user's input reaches (diffusers configs, PIL);
# OSError: unreadable or unwritable paths, an unreachable hub, missing weights.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)


def os_error_message(exc: OSError, what: str = "") -> str:
    """One line for an OSError: `what` (e.g. "output_dir"), the path, and what to do about it."""
    path = exc.filename if exc.filename is not None else ""
    advice = OS_ADVICE.get(exc.errno or -1) or (exc.strerror or str(exc)).lower()
    subject = f"{what} '{os.fsdecode(path)}'" if path != "" else what or "a file operation"
    if exc.filename2 is not None:
        subject += f" -> '{os.fsdecode(exc.filename2)}'"
    return f"{subject.strip()}: {advice}"


def user_error_from_os(exc: OSError, what: str = "") -> UserError:
    """A UserError carrying `os_error_message` (raise it `from exc`)."""
    return UserError(os_error_message(exc, what))


def user_message(exc: BaseException) -> str:
    """The one line a front end shows for an exception in `USER_ERRORS`."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.errno is not None:
        return os_error_message(exc)
    return str(exc)
