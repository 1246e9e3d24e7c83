"""Hydra hooks that keep runs from losing records (registered in conf/hydra/default.yaml).

- ``claim_dir`` (the ``unique_dir`` resolver of the default run and sweep dirs): creates the timestamped dir
  with an exclusive ``mkdir``; a process that finds it taken (two runs started in the same second) takes
  ``<dir>_1``, ``<dir>_2``, ... So the default run dir is never shared by two processes.
- ``RunGuard.on_run_start`` / ``on_multirun_start``: before Hydra writes ``.hydra/`` or opens ``run.log``,
  refuse a dir that already holds a run, cannot be created or is not writable: one line on stderr, exit 1,
  nothing in that dir touched.
- ``RunGuard.on_multirun_end``: the sweep's results table (``results.{csv,md,tex}``: every job, failed ones
  listed apart), plots (``pareto_ppl.png`` / ``pareto_avg.png``: perplexity / zero-shot average against
  parameters kept, one line per method; ``heatmap_ppl_<part>.png`` over start x end when a layer range
  varies; ``convergence.png`` for an optimisation study) and, when jobs saved models, their batch analysis
  against the base model (``batch_analysis_results.json``, ``models_summary.json``, ``analysis/<job>/``), and
  ``report.html`` (one self-contained page of the table and plots), all in the sweep dir; then
  one summary line of the jobs' statuses; exit 1 when any job did not complete (the others still ran and are
  recorded).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from core.models.ref import ModelRef
from core.run.record import run_status
from recipes._common import structure_for_ref

log = logging.getLogger(__name__)
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


def ratio_tag(ratio: float) -> str:
    """The seed's folder-name form of a ratio (``0.2`` -> ``2000``, as in ``Wanda_2000``); the ``ratio_tag``
    resolver of conf/experiment/baselines/*.yaml."""
    return f"{round(float(ratio) * 10000):04d}"


def sweep_summary(sweep: Path, jobs: list[Path]) -> list[str]:
    """The results table of every job and the batch analysis of their saved models, written into ``sweep``.
    Returns the files written. A summary that fails is logged, never fatal: the jobs' own records stand.
    (pandas, matplotlib and the analysis modules are imported here, when a sweep ends, not at start-up.)"""
    written: list[str] = []
    try:
        # local: pandas/matplotlib/torch, only when a sweep ends (validation imports this module)
        from analysis.results_table import collect, write_tables

        df = collect([str(j) for j in jobs])
        if not df.empty:
            written += list(write_tables(df, sweep).values())
            from analysis.plots import pareto, range_heatmap  # local: matplotlib, see above

            for y in ("ppl", "avg"):  # the trade-off, one line per method
                p = pareto(df, sweep / f"pareto_{y}.png", y=y, log_y=y == "ppl")
                written += [str(p)] if p else []
            for part in ("attn_layers", "mlp_layers"):  # layer-range sweeps
                p = range_heatmap(df, sweep / f"heatmap_ppl_{part}.png", part=part)
                written += [str(p)] if p else []
    except Exception as e:  # noqa: BLE001  (a summary never hides the jobs' results)
        log.error("sweep table failed: %s: %s", type(e).__name__, e)
    try:
        p = _study_convergence(sweep, jobs)
        written += [str(p)] if p else []
    except Exception as e:  # noqa: BLE001
        log.error("sweep convergence plot failed: %s: %s", type(e).__name__, e)
    models = [j for j in jobs if (j / "model").is_dir()]
    if models:
        written += _batch_analysis(sweep, models)
    try:  # last: the page embeds the table and every plot above
        from analysis.html_report import write_report  # local: pandas, see above

        written.append(str(write_report([sweep], sweep / "report.html")))
    except Exception as e:  # noqa: BLE001
        log.error("sweep report failed: %s: %s", type(e).__name__, e)
    return written


def _batch_analysis(sweep: Path, models: list[Path]) -> list[str]:
    """The batch analysis of the jobs' saved models against the base model, in the sweep dir."""
    try:
        # local: pandas/matplotlib/torch, only when a sweep ends (validation imports this module)
        from analysis.batch import batch_analyze

        m = json.loads((models[0] / "metrics.json").read_text())
        model_cfg = (m.get("config") or {}).get("model") or {}
        cache = ((m.get("config") or {}).get("paths") or {}).get("cache_dir") or ".cache"
        base, base_dir = structure_for_ref(ModelRef.of(model_cfg), cache_dir=cache, count_nonzero=True)
        batch_analyze(sweep, base, sweep, count_nonzero=True, base_model_dir=base_dir)
        return [str(sweep / "batch_analysis_results.json"), str(sweep / "models_summary.json")]
    except Exception as e:  # noqa: BLE001
        log.error("sweep batch analysis failed: %s: %s", type(e).__name__, e)
        return []


def _study_convergence(sweep: Path, jobs: list[Path]) -> Optional[Path]:
    """``convergence.png`` for an optimisation study (a sweeper other than Hydra's basic grid): every trial's
    ``optimized_metric`` in launch order and the best so far; failed trials marked. None for grid sweeps."""
    sweeper = ""
    for cfg_file in [sweep / "multirun.yaml", *(j / ".hydra" / "hydra.yaml" for j in jobs)]:
        try:  # the basic sweeper writes multirun.yaml; every job keeps the hydra config it ran with
            sweeper = str(OmegaConf.load(cfg_file).hydra.sweeper._target_)
            break
        except Exception:  # noqa: BLE001 - not there: try the next; none (a hand-made folder): not a study
            continue
    if not sweeper or "BasicSweeper" in sweeper:
        return None
    trials, metric, direction = [], "objective", "minimize"
    for job in jobs:
        try:
            m = json.loads((job / "metrics.json").read_text())
            number = int((m.get("hydra") or {}).get("job_num", job.name))
        except (OSError, ValueError):
            continue
        target = m.get("optimized_metric") or {}
        metric, direction = target.get("name") or metric, target.get("direction") or direction
        trials.append((number, target.get("value") if m.get("status") == "completed" else None))
    # local: pandas/matplotlib/torch, only when a sweep ends (validation imports this module)
    from analysis.plots import study_convergence

    return study_convergence(trials, sweep / "convergence.png", metric=metric, direction=direction)


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
            if status not in ("completed", "dry_run"):  # dry_run: a plan, printed and recorded (recipes/_plan.py)
                bad.append(f"job {job.name} {status}" + (f" ({reason[:200]})" if reason else ""))
        if not jobs:
            _fail(f"sweep {sweep}: no job ran (do the sweep's parameters name existing options?)")
        files = sweep_summary(sweep, jobs)
        summary = f"sweep {sweep}: {len(jobs) - len(bad)} of {len(jobs)} jobs completed"
        summary += "".join(f"; {b}" for b in bad)
        if str(sweep / "results.md") in files:
            summary += f"; results table {sweep / 'results.md'}"
        if str(sweep / "report.html") in files:
            summary += f"; report {sweep / 'report.html'}"
        if bad:
            _fail(summary)
        print(summary, file=sys.stderr, flush=True)
