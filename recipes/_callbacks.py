"""Hydra hooks that keep runs from losing records (registered in conf/hydra/default.yaml).

- ``claim_dir`` (the ``unique_dir`` resolver of the default run and sweep dirs): creates the timestamped dir
  with an exclusive ``mkdir``; a process that finds it taken (two runs started in the same second) takes
  ``<dir>_1``, ``<dir>_2``, ... So the default run dir is never shared by two processes.
- ``RunGuard.on_run_start`` / ``on_multirun_start``: before Hydra writes ``.hydra/`` or opens ``run.log``,
  refuse a dir that already holds a run, cannot be created or is not writable: one line on stderr, exit 1,
  nothing in that dir touched.
- ``RunGuard.on_multirun_end``: one summary line of the jobs' statuses; exit 1 when any job did not complete
  (the others still ran and are recorded).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

_CLAIMED: dict[str, str] = {}


def claim_dir(base: str) -> str:
    """``base``, or ``base_<n>`` if taken, created exclusively; the same answer for the same base in a process."""
    if base in _CLAIMED:
        return _CLAIMED[base]
    path = Path(base)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for i in range(10_000):
            candidate = path if i == 0 else path.with_name(f"{path.name}_{i}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            _CLAIMED[base] = str(candidate)
            return str(candidate)
    except OSError:
        pass  # unwritable: RunGuard reports it in one line
    return base


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _holds_run(path: Path) -> bool:
    return (path / "metrics.json").exists() or (path / ".hydra").exists()


def _usable(path: Path, key: str) -> None:
    if path.exists() and not path.is_dir():
        _fail(f"{key}={path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"{key}={path} cannot be created: {e.strerror or e}")
    if not os.access(path, os.W_OK | os.X_OK):
        _fail(f"{key}={path} is not writable")


class RunGuard(Callback):
    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        path = Path(str(config.hydra.run.dir))
        if _holds_run(path):
            _fail(f"{path} already holds a run; runs never overwrite each other (choose another hydra.run.dir, "
                  "or leave it out: the default is a new dir)")
        _usable(path, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        path = Path(str(config.hydra.sweep.dir))
        if path.is_dir() and any(_holds_run(p) for p in path.iterdir() if p.is_dir()):
            _fail(f"{path} already holds a sweep; runs never overwrite each other (choose another "
                  "hydra.sweep.dir, or leave it out: the default is a new dir)")
        _usable(path, "hydra.sweep.dir")

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from core.record import run_status

        sweep = Path(str(config.hydra.sweep.dir))
        jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and _holds_run(p)), key=lambda p: p.name)
        bad = []
        for job in jobs:
            try:
                m = json.loads((job / "metrics.json").read_text())
                status = run_status(m)
                reason = " ".join(((m.get("error") or {}).get("message") or "").split())
            except (OSError, ValueError):
                status, reason = "no record", ""
            if status != "completed":
                bad.append(f"job {job.name} {status}" + (f" ({reason[:200]})" if reason else ""))
        summary = f"sweep {sweep}: {len(jobs) - len(bad)} of {len(jobs)} jobs completed"
        if bad:
            _fail(summary + "; " + "; ".join(bad))
        print(summary, file=sys.stderr, flush=True)
