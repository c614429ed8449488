"""The README's first Python example (the public API tour) runs as written on `tiny`."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_api_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    tour = next(block for block in python_blocks() if "import personalize as P" in block)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(tour, "README.md", "exec"), namespace)
    assert (tmp_path / "concept.safetensors").is_file()
    assert namespace["ad"].num_trainable > 0
    assert "svfit" in capsys.readouterr().out
