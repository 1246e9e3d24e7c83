"""task=report: one self-contained, offline HTML page of a sweep (or of any folder of run dirs).

    python run.py task=report runs='[outputs/multirun/2026-11-22/11-00-00]'   # -> .../11-00-00/report.html

The page (``analysis.html_report``) goes next to the sweep's ``results.csv``: ``<first of runs>/report.html``
(the folder holding it when the first entry is a ``metrics.json``). It shows every run: the results of completed
ones, the others with their status and error; the sweep's plots and each model's analysis plots are embedded, so
the one file can be copied off a cluster and opened anywhere. ``runs`` must be given: a report of everything
under ``outputs/`` is rarely meant.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRICS: dict[str, str] = {}
REPORT_NAME = "report.html"


def _sources(cfg: DictConfig) -> list[Path]:
    return [Path(str(r)).expanduser() for r in cfg.runs]


def _out_path(sources: list[Path]) -> Path:
    first = sources[0]
    return (first if first.is_dir() else first.parent) / REPORT_NAME


def validate(cfg: DictConfig) -> list[str]:
    sources = _sources(cfg)
    if not sources:
        return ["runs: give the sweep dir (or run dirs) to report on, e.g. "
                "task=report runs='[outputs/multirun/2026-11-22/11-00-00]'"]
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        return [f"runs: no such run dir(s): {', '.join(missing)}"]
    out_dir = _out_path(sources).parent
    if not os.access(out_dir, os.W_OK | os.X_OK):
        return [f"runs: {out_dir} is not writable: the report is written there as {REPORT_NAME}"]
    return []


def run(cfg: DictConfig, ctx: Any) -> dict:
    from analysis.html_report import write_report  # local: pandas; validation imports this module

    sources = _sources(cfg)
    path = write_report(sources, _out_path(sources), exclude=[ctx.run_dir])
    ctx.log("report", {"sources": [str(p) for p in sources], "path": str(path), "bytes": path.stat().st_size})
    log.info("report: %s", path.resolve())
    return {}
