"""``task=analyze`` and ``task=batch_analyze``: the only analysis code that sees a DictConfig.

    python run.py task=analyze model=<path> base=smollm2            # one model vs its base
    python run.py task=batch_analyze models_dir=<dir> base=smollm2  # a folder of models
    (+ allow_pickle=true for legacy torch pickles you trust; count_nonzero=false for shapes only)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from analysis.batch import batch_analyze
from analysis.report import write_analysis
from analysis.structure import ModelStructure, structure_of

log = logging.getLogger(__name__)


def structure_for_model_cfg(model_cfg: dict, *, cache_dir: str, count_nonzero: bool = False,
                            allow_pickle: bool = False, fallback_config: Optional[dict] = None
                            ) -> tuple[ModelStructure, Optional[Path]]:
    """(structure, model dir or None) for a model cfg dict; checkpoints are read from headers."""
    from core.models import build_tiny, cached_gguf_dir

    kind = model_cfg.get("kind")
    name = model_cfg.get("name") or "model"
    if kind == "tiny":
        model, _ = build_tiny(**model_cfg["tiny"])
        s = structure_of(model, name=name, count_nonzero=count_nonzero)
        del model
        return s, None
    if kind == "gguf":
        path = cached_gguf_dir(model_cfg, cache_dir)  # converts once (~20 s), then a safetensors dir
    else:
        if not model_cfg.get("path"):
            raise ValueError(f"model '{name}' has no path: give model=<path> or a model name")
        path = Path(model_cfg["path"])
    s = structure_of(path, name=name, count_nonzero=count_nonzero, allow_pickle=allow_pickle,
                     fallback_config=fallback_config)
    return s, Path(s.model_dir) if s.model_dir else path


def _base_structure(cfg: DictConfig, count_nonzero: bool) -> tuple[Optional[ModelStructure], Optional[Path]]:
    if not cfg.base:
        return None, None
    from core.models import resolve_model_ref

    base_cfg = resolve_model_ref(str(cfg.base))
    return structure_for_model_cfg(base_cfg, cache_dir=cfg.paths.cache_dir, count_nonzero=count_nonzero,
                                   allow_pickle=bool(cfg.allow_pickle))


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


def run_analyze(cfg: DictConfig, ctx: Any) -> dict:
    """Analyse ``model`` (any format), compared with ``base`` when given; outputs in <run_dir>/analysis/."""
    count_nonzero = bool(cfg.get("count_nonzero", True))
    base, base_dir = _base_structure(cfg, count_nonzero)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    s, model_dir = structure_for_model_cfg(model_cfg, cache_dir=cfg.paths.cache_dir, count_nonzero=count_nonzero,
                                           allow_pickle=bool(cfg.allow_pickle),
                                           fallback_config=base.config if base is not None else None)
    if model_cfg.get("kind") == "hf" and model_cfg.get("path"):
        s.name = Path(model_cfg["path"]).name if Path(model_cfg["path"]).is_dir() else Path(model_cfg["path"]).stem
    target = s.meta.get("target_sparsity")
    summary = write_analysis(ctx.run_dir / "analysis", s, base, expected_ranges=_ranges_from_info(s.meta),
                             target_sparsity=float(target) if target is not None else None,
                             model_dir=model_dir, base_model_dir=base_dir, ctx=ctx)
    log.info("analysis of %s written to %s", s.name, summary["dir"])
    if summary.get("comparison_error"):
        log.error("not compared with base=%s: %s", cfg.base, summary["comparison_error"])
    return summary


def run_batch_analyze(cfg: DictConfig, ctx: Any) -> dict:
    """Analyse every model in ``models_dir`` against ``base``; summaries in the run dir."""
    count_nonzero = bool(cfg.get("count_nonzero", True))
    base, base_dir = _base_structure(cfg, count_nonzero)
    result = batch_analyze(cfg.models_dir, base, ctx.run_dir, allow_pickle=bool(cfg.allow_pickle),
                           count_nonzero=count_nonzero, base_model_dir=base_dir, ctx=ctx)
    log.info("batch analysis of %s: %s", cfg.models_dir, result["counts"])
    return {"counts": result["counts"], "models": [
        {k: r.get(k) for k in ("name", "format", "status", "reason", "error", "output_dir")}
        for r in result["models"]]}
