"""task=report: one self-contained, offline HTML page of a sweep (or of any folder of run dirs).

    python run.py task=report runs='[outputs/multirun/2026-11-22/11-00-00]'   # -> <this run's dir>/report.html
    python run.py task=report runs='[...]' next_to_inputs=true               # and a copy in the sweep's dir

The page (``analysis.html_report``) is written into this run's own dir, like every output of a run: the inputs
are only read. ``next_to_inputs=true`` also puts a copy next to the sweep's ``results.csv``:
``<first of runs>/report.html`` (the folder holding it when the first entry is a ``metrics.json``). That copy
never replaces a file (an earlier report.html stays as it is) and is never written into the dir of a run that
is still running; where it went is recorded (``report.copy``) and printed. The page shows every run: the
results of completed ones, the others with their status and error; the sweep's plots and each model's analysis
plots are embedded, so the one file can be copied off a cluster and opened anywhere. ``runs`` must be given: a
report of everything under ``outputs/`` is rarely meant.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from core.run.errors import DataError
from core.run.record import run_status

log = logging.getLogger(__name__)

METRICS: dict[str, str] = {}
REPORT_NAME = "report.html"


def _sources(cfg: DictConfig) -> list[Path]:
    return [Path(str(r)).expanduser() for r in cfg.runs]


def _copy_path(sources: list[Path]) -> Path:
    """Where ``next_to_inputs=true`` puts the copy: the first source's dir."""
    first = sources[0]
    return (first if first.is_dir() else first.parent) / REPORT_NAME


def _live_run(folder: Path, own: Optional[Path]) -> Optional[Path]:
    """``folder`` or a run dir directly in it (a sweep's job) whose run is still running, else None; ``own``:
    this report's run dir, never counted (before the run starts it has no record yet)."""
    for d in (folder, *(p for p in sorted(folder.iterdir()) if p.is_dir())):
        if own is not None and d.resolve() == own.resolve():
            continue
        try:
            m = json.loads((d / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and run_status(m) == "running":
            return d
    return None


def _copy_errors(sources: list[Path], own: Optional[Path] = None) -> list[str]:
    """Why the copy next to the inputs cannot be written (empty: it can)."""
    target = _copy_path(sources)
    if target.exists() or target.is_symlink():
        return [f"next_to_inputs=true: {target} exists (an earlier report) and is never replaced; remove it, "
                "or leave next_to_inputs out: the report is written into this run's dir"]
    if not os.access(target.parent, os.W_OK | os.X_OK):
        return [f"next_to_inputs=true: {target.parent} is not writable (leave next_to_inputs out: the report is "
                "written into this run's dir)"]
    live = _live_run(target.parent, own)
    if live is not None:
        return [f"next_to_inputs=true: {live} is a run still in progress; nothing is written into a live run's dir "
                "(leave next_to_inputs out: the report is written into this run's dir)"]
    return []


def validate(cfg: DictConfig) -> list[str]:
    sources = _sources(cfg)
    if not sources:
        return ["runs: give the sweep dir (or run dirs) to report on, e.g. "
                "task=report runs='[outputs/multirun/2026-11-22/11-00-00]'"]
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        return [f"runs: no such run dir(s): {', '.join(missing)}"]
    return _copy_errors(sources) if cfg.next_to_inputs else []


def run(cfg: DictConfig, ctx: Any) -> dict:
    from analysis.html_report import write_report  # local: pandas; validation imports this module
    from core.run.io import atomic_write_text

    sources = _sources(cfg)
    path = write_report(sources, Path(ctx.run_dir) / REPORT_NAME, exclude=[ctx.run_dir])
    copy: Optional[Path] = None
    if cfg.next_to_inputs:
        errors = _copy_errors(sources, Path(ctx.run_dir))  # again: the sweep may have started, or a report appeared, meanwhile
        if errors:
            raise DataError(errors[0])
        copy = _copy_path(sources)
        try:  # exclusive: a report.html written meanwhile is never replaced
            atomic_write_text(copy, path.read_text(encoding="utf-8"), exclusive=True)
        except FileExistsError:
            raise DataError(f"next_to_inputs=true: {copy} appeared while the report was written; "
                            f"it is left as it is (this run's copy: {path})") from None
    ctx.log("report", {"sources": [str(p) for p in sources], "path": str(path), "bytes": path.stat().st_size,
                       "copy": str(copy) if copy else None})
    log.info("report: %s", path.resolve())
    if copy is not None:
        log.info("report: copied next to the inputs (next_to_inputs=true): %s", copy.resolve())
    return {}
