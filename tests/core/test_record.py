"""The run record: exclusive creation, a heartbeat that never races the run's own writes, one final status."""

from __future__ import annotations

import json
import threading
import time

import pytest

from core.run.errors import RunDirError
from core.run.record import RunContext, run_status


def test_heartbeat_and_logging_share_the_record_safely(tmp_path, monkeypatch):
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))  # a crashed heartbeat
    ctx = RunContext(tmp_path, task="prune", heartbeat_s=0.001)
    first = json.loads((tmp_path / "metrics.json").read_text())["heartbeat_unix"]
    for i in range(300):  # many sections added while the heartbeat rewrites the file
        ctx.log(f"section_{i}", {"value": i, "nested": {"i": i}})
    time.sleep(0.05)
    ctx.finish("completed")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert not errors and m["status"] == "completed" and m["section_299"]["value"] == 299
    assert m["heartbeat_unix"] > first and run_status(m) == "completed"
    ctx.finish("failed")  # the first final status stays
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "completed"


def test_a_record_is_never_created_over_another(tmp_path):
    RunContext(tmp_path, task="prune", heartbeat_s=None).finish("completed")
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run"):
        RunContext(tmp_path, task="prune", heartbeat_s=None)
    assert (tmp_path / "metrics.json").read_bytes() == before
