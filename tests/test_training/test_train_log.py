"""The training log: a resumed run keeps the records up to its checkpoint, even after a torn last line."""

from __future__ import annotations

import json

from personalize.training.outputs import LOG_FILE, TrainLog


def test_resume_tolerates_a_torn_last_line(tmp_path):
    records = [{"step": 0, "event": "eval"}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": 0.3}]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo'  # killed mid-write
    (tmp_path / LOG_FILE).write_text(text)
    log = TrainLog(tmp_path, resume_step=2)
    log.write({"step": 3, "loss": 0.31})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert lines == records[:3] + [{"loss": 0.31, "step": 3}]
