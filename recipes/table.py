"""task=table: every run record under ``runs`` (default ``paths.outputs_root``) in one table (CSV, Markdown, LaTeX).

    python run.py task=table runs='[outputs/multirun/2026-11-22/11-00-00]'
    python run.py task=table            # every run under the outputs (the seed's check_model_size.py, no arguments)

Each model row carries its size on disk (``model_bytes``, ``model_GiB``: the run's saved ``model/``, or the model an
evaluate run read, counted as ``task=analyze`` counts it).

Completed runs give the results; every other run (failed, killed, interrupted, dead, still running) is listed
apart, with its status and error and no numbers. The unfinished checkpoint dirs (``.model.partial-*``) of runs
that ended without finishing are removed and reported (``table.orphans_removed``). Listing failed runs is
information: the table run itself completes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from core.run.errors import DataError

log = logging.getLogger(__name__)

METRICS: dict[str, str] = {}


def validate(cfg: DictConfig) -> list[str]:
    runs = list(cfg.runs) or [cfg.paths.outputs_root]
    missing = [str(r) for r in runs if not Path(str(r)).expanduser().exists()]
    return [f"runs: no such run dir(s): {', '.join(missing)}"] if missing else []


def run(cfg: DictConfig, ctx: Any) -> dict:
    # local: pandas; validation imports this module
    from analysis.results_table import collect, find_metrics, remove_orphans, split_completed, write_tables

    sources = [str(Path(r).expanduser()) for r in (list(cfg.runs) or [cfg.paths.outputs_root])]
    found = [f for f in find_metrics(sources) if f.parent.resolve() != Path(ctx.run_dir).resolve()]
    orphans: list[str] = []
    notes: dict[str, str] = {}
    for f in found:
        removed = remove_orphans(f.parent)  # only runs that ended without finishing; never a live one
        if removed:
            orphans += removed
            notes[str(f.parent)] = "removed unfinished " + ", ".join(Path(p).name for p in removed)
    df = collect(found, notes=notes)
    if df.empty:
        raise DataError(f"table: no evaluated runs (metrics.json with an `eval` section) and no unfinished runs "
                        f"under {', '.join(sources)}")
    done, incomplete = split_completed(df)
    files = write_tables(df, ctx.run_dir)
    ctx.log("table", {"sources": sources, "runs": len(found), "rows": len(df), "result_rows": len(done),
                      "incomplete": {str(k): int(n) for k, n in incomplete["status"].value_counts().items()},
                      "orphans_removed": orphans, "files": files})
    ctx.log_table("results", df)
    if len(incomplete):
        log.warning("table: %d run(s) did not complete (%s); listed apart, without numbers", len(incomplete),
                    ", ".join(f"{n} {s}" for s, n in incomplete["status"].value_counts().items()))
    log.info("results table (%d rows from %d runs):\n%s", len(df), len(found), Path(files["markdown"]).read_text())
    return {}
