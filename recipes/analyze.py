"""task=analyze: one model's structure, sizes and per-layer retention, compared with ``base``.

    python run.py task=analyze model=<path> base=smollm2
    (+ allow_pickle=true for legacy torch pickles you trust; count_nonzero=false for shapes only)

The report (``structure_summary.txt``: totals, per-layer summary, per-module dimensions, sizes) is also printed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import DictConfig

from recipes._common import model_ref, resolve_model, structure_for_ref

if TYPE_CHECKING:
    from analysis.structure import ModelStructure

log = logging.getLogger(__name__)

METRICS: dict[str, str] = {}


def validate(cfg: DictConfig) -> list[str]:
    return []


def _base_structure(cfg: DictConfig, count_nonzero: bool) -> tuple[Optional[ModelStructure], Optional[Path]]:
    if not cfg.base:
        return None, None
    return structure_for_ref(resolve_model(str(cfg.base)), cache_dir=cfg.paths.cache_dir,
                             count_nonzero=count_nonzero, allow_pickle=bool(cfg.allow_pickle))


def _ranges_from_info(meta: dict) -> Optional[dict]:
    """checkpoint_info.json's layer_ranges ({"attention": [s, e], ...}) -> expected_ranges."""
    ranges = meta.get("layer_ranges")
    if not isinstance(ranges, dict):
        return None
    out = {}
    for group, r in ranges.items():
        if isinstance(r, dict) and "start" in r:
            r = [r["start"], r["end"]]
        if isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, int) for v in r):
            out[group] = list(r)
    return out or None


def run(cfg: DictConfig, ctx: Any) -> dict:
    """Analyse ``model`` (any format), compared with ``base`` when given; outputs in <run_dir>/analysis/."""
    from analysis.report import write_analysis  # local: torch, pandas, matplotlib; validation imports this module

    count_nonzero = bool(cfg.count_nonzero)
    base, base_dir = _base_structure(cfg, count_nonzero)
    ref = model_ref(cfg.model)
    s, model_dir = structure_for_ref(ref, cache_dir=cfg.paths.cache_dir, count_nonzero=count_nonzero,
                                     allow_pickle=bool(cfg.allow_pickle),
                                     fallback_config=base.config if base is not None else None)
    if ref.kind == "hf" and ref.path:
        s.name = Path(ref.path).name if Path(ref.path).is_dir() else Path(ref.path).stem
    target = s.meta.get("target_sparsity")
    summary = write_analysis(ctx.run_dir / "analysis", s, base, expected_ranges=_ranges_from_info(s.meta),
                             target_sparsity=float(target) if target is not None else None,
                             model_dir=model_dir, base_model_dir=base_dir, ctx=ctx)
    # the console gets the report, as the seed's analyze_pruning.py printed it: totals, the per-layer summary
    # (original / compressed parameters, retention, sparsity), the per-module dimensions and the sizes
    log.info("analysis of %s:\n%s", s.name, (Path(summary["dir"]) / "structure_summary.txt").read_text())
    log.info("analysis of %s written to %s", s.name, summary["dir"])
    if summary.get("comparison_error"):
        log.error("not compared with base=%s: %s", cfg.base, summary["comparison_error"])
    return {}
