"""Atomic writes: the finished file has the mode a plain write gives it (umask honoured), not 0600."""

from __future__ import annotations

import stat

from personalize.atomic import FILE_MODE, write_text_atomic


def test_atomic_file_mode_matches_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text_atomic(tmp_path / "atomic.txt", "x")
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode) == FILE_MODE
