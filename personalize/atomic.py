"""Atomic file writes: a crash or a cancel never leaves a half-written file behind.

The finished file gets the permissions a plain `open(path, "w")` would give it (0666 less the
umask), not the 0600 of the private temporary file it was written to. `make_writable_dir` checks an
output folder before slow work starts, and `remove_empty_dirs` takes back what a failed run created.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import user_error_from_os


def _umask() -> int:
    """The process umask; reading it means setting it, so it is read once, at import (no thread races)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open(path, "w") creates


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename. An OSError
    about the temporary file (a read-only folder, a full disk) names `path` instead."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _naming(exc, target) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except OSError as exc:
        if exc.filename is None or Path(os.fsdecode(exc.filename)) != tmp:
            raise
        raise _naming(exc, target) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` (same errno, same subclass) about `path` instead of a temporary file the user never asked for."""
    return OSError(exc.errno, exc.strerror, str(path)) if exc.errno is not None else OSError(f"{path}: {exc}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_writable_dir(path: str | os.PathLike, what: str) -> list[Path]:
    """Create the folder `path` (and missing parents) and check that files can be written in it, before
    any slow work starts. Returns the folders this call created, outermost first, for `remove_empty_dirs`.
    Failures are one-line UserErrors naming `what` (a config field such as output_dir) and the path."""
    folder = Path(path).expanduser().absolute()
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(errno.EEXIST, "File exists", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        _check_writable(folder)
    except OSError as exc:
        remove_empty_dirs(missing)
        raise user_error_from_os(exc, what) from exc
    return missing


def _check_writable(folder: Path) -> None:
    """Create and drop a file in `folder`; a failure names the folder, not the probe file."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise _naming(exc, folder) from exc


def remove_empty_dirs(created: list[Path]) -> None:
    """Remove the folders in `created` (outermost first) that are still empty: a failed run leaves no trace."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): the folders above it are not empty either
