"""Batch analysis of a folder of compressed models (replaces the seed's batch_model_analysis.py).

Each entry of ``models_dir`` (a subdir or a weight file) is detected (``core.models.legacy.detect_format``),
analysed one at a time (structure from safetensors headers where possible, freed before the next),
compared with the base, and written to ``<run_dir>/analysis/<name>/``: the models' folders are only read. With
``next_to_inputs=True`` it goes to ``<model>/analysis/`` instead, unless that is not writable or already holds an
analysis (nothing is overwritten); each model's output dir is recorded and logged. A failing model is recorded
and the batch goes on.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from analysis.report import write_analysis
from analysis.structure import ModelStructure, structure_of
from core.models.legacy import FormatInfo, detect_format
from core.run.io import atomic_write_json

log = logging.getLogger(__name__)

_SKIP = {"analysis", "__pycache__", ".hydra", "wandb"}


def scan_models(models_dir: str | Path) -> list[tuple[str, Path, FormatInfo]]:
    """(name, path, format) for every entry of ``models_dir``, sorted by name."""
    root = Path(models_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"models_dir={root} is not a directory")
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name in _SKIP:
            continue
        if p.is_file() and p.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            continue
        out.append((p.stem if p.is_file() else p.name, p, detect_format(p)))
    return out


def _writable_dir(target: Path) -> bool:
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def output_dir_for(path: Path, name: str, run_dir: Path, next_to_inputs: bool = False) -> Path:
    """``<run_dir>/analysis/<name>/``; with ``next_to_inputs``, ``<model>/analysis/`` when writable and not
    holding anything yet (an earlier analysis, e.g. a prune run's own, is never added to or overwritten)."""
    target = path / "analysis"
    if next_to_inputs and path.is_dir() and not target.exists() and _writable_dir(target):
        return target
    return run_dir / "analysis" / name


def model_summary(name: str, s: ModelStructure, base: Optional[ModelStructure]) -> dict:
    """One entry of models_summary.json (the seed's fields, plus format and removed layers)."""
    entry: dict[str, Any] = {
        "name": name, "format": s.format, "total_params": s.total_params, "num_layers": s.num_layers,
        "layer_params": s.layer_params, "embedding_params": s.embedding_params,
        "lm_head_params": s.lm_head_params, "tied_embeddings": s.tied_embeddings,
        "nonzero_params": s.nonzero_params,
    }
    if base is not None:
        structural = (base.total_params - s.total_params) / base.total_params if base.total_params else None
        # reduction_ratio (the seed's field) stays structural: parameters gone from the shapes. A mask (magnitude,
        # wanda) keeps every parameter, so its reduction is in nonzero_reduction_ratio: the share of the base's
        # non-zero weights gone (against its dense count when the base's non-zeros were not counted); None when
        # the model's non-zeros were not counted (count_nonzero=false).
        nz, base_nz = s.nonzero_params, base.nonzero_params
        ref = base_nz if base_nz is not None else base.total_params
        entry["pruning"] = {"original_params": base.total_params, "pruned_params": s.total_params,
                            "reduction_ratio": structural, "structural_reduction_ratio": structural,
                            "original_nonzero": base_nz, "pruned_nonzero": nz,
                            "nonzero_reduction_ratio": max(0.0, 1 - nz / ref) if nz is not None and ref else None}
    return entry


def batch_analyze(models_dir: str | Path, base: Optional[ModelStructure], run_dir: str | Path, *,
                  allow_pickle: bool = False, count_nonzero: bool = False,
                  base_model_dir: Optional[str | Path] = None, ctx: Any = None, next_to_inputs: bool = False) -> dict:
    """Analyse every model in ``models_dir``; write batch_analysis_results.json and models_summary.json into
    ``run_dir``, each model's analysis into ``run_dir/analysis/<name>/`` (``next_to_inputs``: next to the model
    where that writes over nothing)."""
    run_dir = Path(run_dir)
    entries = scan_models(models_dir)
    results: list[dict] = []
    summaries: list[dict] = []
    fallback = base.config if base is not None else None
    for k, (name, path, fmt) in enumerate(entries, 1):
        rec: dict[str, Any] = {"name": name, "path": str(path), "format": fmt.kind, "reason": fmt.reason}
        if fmt.kind == "unknown" and fmt.weights_path is not None:  # a weight file that cannot be read
            rec.update(status="failed", error=fmt.reason)
            log.error("[%d/%d] %s failed: %s", k, len(entries), name, fmt.reason)
            results.append(rec)
            continue
        if fmt.kind in ("eval_only", "unknown"):
            rec["status"] = "skipped"
            log.info("[%d/%d] skip %s: %s", k, len(entries), name, fmt.reason)
            results.append(rec)
            continue
        log.info("[%d/%d] analysing %s (%s)", k, len(entries), name, fmt.kind)
        t0 = time.perf_counter()
        s: Optional[ModelStructure] = None
        try:
            s = structure_of(path, name=name, count_nonzero=count_nonzero, allow_pickle=allow_pickle,
                             fallback_config=fallback)
            out = output_dir_for(path, name, run_dir, next_to_inputs)
            if next_to_inputs and run_dir not in out.parents:
                log.info("[%d/%d] %s: analysis written next to the model (next_to_inputs=true): %s", k, len(entries),
                         name, out)
            summary = write_analysis(out, s, base, model_dir=s.model_dir if path.is_dir() else path,
                                     base_model_dir=base_model_dir)
            rec.update(status="ok", output_dir=str(out), seconds=round(time.perf_counter() - t0, 3),
                       summary=summary)
            if summary.get("comparison_error"):
                rec["status"] = "ok_no_comparison"
            summaries.append(model_summary(name, s, base))
        except Exception as e:  # one broken model must not stop the batch
            rec.update(status="failed", error=f"{type(e).__name__}: {e}",
                       traceback="".join(traceback.format_exception(e))[-2000:])
            log.error("[%d/%d] %s failed: %s: %s", k, len(entries), name, type(e).__name__, e)
        finally:
            del s
            gc.collect()  # models are analysed one at a time; free each before the next
        results.append(rec)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    batch = {"timestamp": now, "models_dir": str(models_dir), "base": base.name if base else None,
             "next_to_inputs": next_to_inputs, "counts": counts, "models": results}
    models_summary = {"timestamp": now, "models_dir": str(models_dir), "base": base.name if base else None,
                      "models": summaries}
    atomic_write_json(run_dir / "batch_analysis_results.json", batch)
    atomic_write_json(run_dir / "models_summary.json", models_summary)
    if ctx is not None:
        ctx.log("batch_analyze", {"counts": counts, "models_dir": str(models_dir), "next_to_inputs": next_to_inputs,
                                  "written_next_to_inputs": [r["output_dir"] for r in results if r.get("output_dir")
                                                             and run_dir not in Path(r["output_dir"]).parents]})
        ctx.log_table("batch/models", pd.DataFrame(
            [{"name": r["name"], "format": r["format"], "status": r["status"],
              "total_params": (r.get("summary") or {}).get("total_params"),
              "reduction_ratio": (r.get("summary") or {}).get("reduction_ratio"),
              "nonzero_reduction_ratio": (r.get("summary") or {}).get("nonzero_reduction_ratio"),
              "reason": r.get("error") or r["reason"]} for r in results]))
    return batch
