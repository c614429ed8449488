"""The CPU allocator tuning applies once on glibc Linux and is harmless elsewhere."""

from __future__ import annotations

import ctypes
import sys

import pytest

from personalize import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_thresholds_are_set_once(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert allocator.tune_cpu_allocator()
    assert allocator.tune_cpu_allocator()  # second call: nothing more
    assert calls == [(-3, allocator.MMAP_THRESHOLD), (-1, allocator.TRIM_THRESHOLD)]


def test_a_libc_without_mallopt_is_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # e.g. musl: no mallopt symbol
    assert allocator.tune_cpu_allocator() is False
