"""task=batch_analyze: every model in ``models_dir`` (any format) analysed against ``base``, one summary.

    python run.py task=batch_analyze models_dir=<dir> base=smollm2
    (+ allow_pickle=true for legacy torch pickles you trust; count_nonzero=false for shapes only)

Everything goes into one folder of this run's dir, ``<run dir>/<output_name>/`` (default
``<models_dir's name>_analysis``: ``baselines_analysis`` for ``models_dir=baselines/``, the seed's
``--output_dir``): ``batch_analysis_results.json``, ``models_summary.json`` and each model's ``analysis/<name>/``;
the models' folders are only read. ``next_to_inputs=true`` writes a model's analysis to ``<model>/analysis/``
instead where that folder does not exist yet (recorded per model in ``batch_analysis_results.json`` and logged).
The folder is recorded in metrics.json (``output``).

Every model is tried and recorded; the run fails (exit 1, one line naming them) when any model failed, or when
no model in the folder could be analysed (every entry skipped, or the folder empty).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from core.run.config import derived_output_name
from core.run.errors import DataError
from recipes._common import resolve_model, results_folder, structure_for_ref

log = logging.getLogger(__name__)

METRICS: dict[str, str] = {}
OUTPUT_NAME = True  # writes its results into <run dir>/<output_name>/ (run.check refuses the key elsewhere)


def validate(cfg: DictConfig) -> list[str]:
    errors: list[str] = []
    if not cfg.models_dir:
        return ["task=batch_analyze needs models_dir=<folder of models>"]
    path = Path(str(cfg.models_dir)).expanduser()
    if not path.is_dir():
        errors.append(f"models_dir={cfg.models_dir}: {'not a folder' if path.exists() else 'no such folder'}")
    return errors


def output_name(cfg: DictConfig) -> str:
    """``output_name``, or ``<models_dir's folder name>_analysis`` (the seed's ``baselines_analysis``)."""
    if cfg.output_name is not None:
        return str(cfg.output_name)
    folder = Path(str(cfg.models_dir)).expanduser().resolve().name
    return derived_output_name(f"{folder}_analysis", "batch_analysis")


def run(cfg: DictConfig, ctx: Any) -> dict:
    from analysis.batch import batch_analyze  # local: torch, pandas, matplotlib; validation imports this module

    name = output_name(cfg)
    out = results_folder(ctx, Path(ctx.run_dir), name, cfg.output_name is None, what="results folder")
    out.mkdir()
    count_nonzero = bool(cfg.count_nonzero)
    base, base_dir = (structure_for_ref(resolve_model(str(cfg.base)), cache_dir=cfg.paths.cache_dir,
                                        count_nonzero=count_nonzero, allow_pickle=bool(cfg.allow_pickle))
                      if cfg.base else (None, None))
    result = batch_analyze(cfg.models_dir, base, out, allow_pickle=bool(cfg.allow_pickle),
                           count_nonzero=count_nonzero, base_model_dir=base_dir, ctx=ctx,
                           next_to_inputs=bool(cfg.next_to_inputs))
    log.info("batch analysis of %s: %s", cfg.models_dir, result["counts"])
    failed = [r["name"] for r in result["models"] if r.get("status") == "failed"]
    if not any(str(r.get("status", "")).startswith("ok") for r in result["models"]):
        skipped = [f"{r['name']} ({r.get('reason') or r.get('status')})" for r in result["models"]
                   if r.get("status") != "failed"]
        raise DataError(f"batch_analyze: no model in {cfg.models_dir} could be analysed ({len(result['models'])} "
                        f"entries: {len(failed)} failed, {len(result['models']) - len(failed)} skipped"
                        f"{': ' + '; '.join(skipped[:3]) if skipped else ''}); see "
                        f"{out / 'batch_analysis_results.json'}")
    if failed:
        raise DataError(f"batch_analyze: {len(failed)} of {len(result['models'])} models failed "
                        f"({', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''}); the others are analysed, "
                        f"see {out / 'batch_analysis_results.json'}")
    return {}
