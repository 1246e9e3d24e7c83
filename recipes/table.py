"""task=table: every run record under ``runs`` (default ``paths.outputs_root``) in one table (CSV, Markdown, LaTeX).

    python run.py task=table runs='[outputs/multirun/2026-11-22/11-00-00]'
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRICS: dict[str, str] = {}


def validate(cfg: DictConfig) -> list[str]:
    runs = list(cfg.runs) or [cfg.paths.outputs_root]
    missing = [str(r) for r in runs if not Path(str(r)).expanduser().exists()]
    return [f"runs: no such run dir(s): {', '.join(missing)}"] if missing else []


def run(cfg: DictConfig, ctx: Any) -> dict:
    from analysis.results_table import collect, find_metrics, write_tables
    from core.errors import DataError

    sources = [str(Path(r).expanduser()) for r in (list(cfg.runs) or [cfg.paths.outputs_root])]
    found = [f for f in find_metrics(sources) if f.parent.resolve() != Path(ctx.run_dir).resolve()]
    df = collect(found)
    if df.empty:
        raise DataError(f"table: no evaluated runs (metrics.json with an `eval` section) under {', '.join(sources)}")
    files = write_tables(df, ctx.run_dir)
    ctx.log("table", {"sources": sources, "runs": len(found), "rows": len(df), "files": files})
    ctx.log_table("results", df)
    log.info("results table (%d rows from %d runs):\n%s", len(df), len(found), Path(files["markdown"]).read_text())
    return {}
