"""Hydra hooks that keep runs from losing records (registered in conf/hydra/default.yaml).

- ``claim_dir`` (the ``unique_dir`` resolver of the default run and sweep dirs): creates the timestamped dir
  with an exclusive ``mkdir``; a process that finds it taken (two runs started in the same second) takes
  ``<dir>_1``, ``<dir>_2``, ... So the default run dir is never shared by two processes.
- ``RunGuard.on_run_start`` / ``on_multirun_start``: before Hydra writes ``.hydra/`` or opens ``run.log``, the
  run or sweep dir (and each job's dir in the sweep) is normalised (``..``, ``~``, symlinks), then refused when it
  holds a run or sweep, lies inside a run, leaves its sweep, cannot be created or is not writable; otherwise it is
  claimed exclusively (a run dir's ``.hydra/``, a sweep dir's ``multirun.yaml``) and resolved again. Any error,
  an OSError such as a too-long name included, is one line on stderr and exit 1, nothing in that dir touched
  (Hydra itself would print a warning and a traceback, and go on into the dir).
- ``RunGuard.on_job_start`` (each run, and each job of a sweep, once Hydra has written ``.hydra/``): ``command.sh``
  beside it, a runnable script that reproduces the job (``cd`` to the repository, ``python run.py`` with the job's
  own overrides, shell-quoted; the environment variables conf/ reads; ``-cd``/``-cn`` when given), written
  atomically and exclusively, executable; the old ``train.sh``. A failure to write it is a warning, never the run's.
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

import copy
import errno
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, open_dict

from core.models.ref import ModelRef
from core.run.io import atomic_write_text
from core.run.record import run_status, saved_checkpoint
from recipes._common import structure_for_ref

log = logging.getLogger(__name__)
_CLAIMED: dict[str, str] = {}
ROOT = Path(__file__).resolve().parent.parent
COMMAND_FILE = "command.sh"  # beside .hydra/ in every run and job dir (core.run.config.RUN_DIR_ENTRIES)


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
    models = [j for j in jobs if saved_model(j) is not None]
    if models:
        written += _batch_analysis(sweep, models)
    try:  # last: the page embeds the table and every plot above
        from analysis.html_report import write_report  # local: pandas, see above

        written.append(str(write_report([sweep], sweep / "report.html")))
    except Exception as e:  # noqa: BLE001
        log.error("sweep report failed: %s: %s", type(e).__name__, e)
    return written


def saved_model(job: Path) -> Optional[Path]:
    """The checkpoint a job saved (``core.run.record.saved_checkpoint`` of its record); None when it saved none."""
    try:
        m = json.loads((job / "metrics.json").read_text())
    except (OSError, ValueError):
        m = {}
    return saved_checkpoint(job, m if isinstance(m, dict) else {})


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


def _env_names(conf_dirs: list[Path]) -> list[str]:
    """The environment variables the config files read (``${oc.env:NAME,...}``), in order of first use."""
    names: list[str] = []
    for d in conf_dirs:
        for f in sorted(d.rglob("*.yaml")) if d.is_dir() else []:
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            names += [n for n in re.findall(r"oc\.env:([A-Za-z_][A-Za-z0-9_]*)", text) if n not in names]
    return names


def command_script(overrides: list[str], *, config_dir: Optional[str] = None, config_name: str = "config",
                   env: Optional[dict[str, str]] = None, run_dir: str = "", python: str = "") -> str:
    """``command.sh``: the bash script that runs ``python run.py <overrides>`` again from the repository root (the
    old ``train.sh``). ``config_dir``: a ``-cd`` the run was given; ``env``: variables to export first (those
    conf/ reads that were set). Overrides appended on its command line come after the run's and win
    (``./command.sh dry_run=true``); ``PYTHON=...`` picks the interpreter. It never names the run dir: run again,
    it writes a new one."""
    args = ([f"-cd {shlex.quote(config_dir)}"] if config_dir else []) + (
        [f"-cn {shlex.quote(config_name)}"] if config_name != "config" else []) + [shlex.quote(o) for o in overrides]
    lines = ["#!/usr/bin/env bash",
             f"# The command of the prunelab run {run_dir}: its .hydra/overrides.yaml, run again from the repository.",
             "# It writes a new run dir (runs never overwrite each other). Overrides given to this script come last",
             "# and win (./command.sh dry_run=true); PYTHON=<interpreter> ./command.sh picks the Python"
             + (f" (this run: {python})." if python else "."),
             "set -e",
             f"cd {shlex.quote(str(ROOT))}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    lines.append(" ".join(['exec "${PYTHON:-python}" run.py', *args, '"$@"']))
    return "\n".join(lines) + "\n"


def write_command(config: Any) -> Optional[Path]:
    """``<job dir>/command.sh`` for the job ``config`` (Hydra's, with ``hydra.*``): exclusive (never over a file),
    atomic, executable. Its overrides are the job's own (a sweep's job: its values, not the sweep's lists)."""
    run_dir = Path(str(config.hydra.runtime.output_dir))
    overrides = [str(o) for o in config.hydra.overrides.task]
    sources = OmegaConf.select(config, "hydra.runtime.config_sources") or []
    cd = next((str(Path(str(s.path).removeprefix("file://")).resolve()) for s in sources
               if str(s.provider) == "command-line"), None)  # -cd, relative to where the run started
    dirs = [ROOT / "conf"] + ([Path(cd)] if cd else [])
    env = {k: os.environ[k] for k in _env_names(dirs) if k in os.environ
           and not (k == "PRUNELAB_ROOT" and os.environ[k] == str(ROOT))}  # the default root: cd says it
    text = command_script(overrides, config_dir=cd, config_name=str(config.hydra.job.config_name or "config"),
                          env=env, run_dir=str(run_dir), python=sys.executable)
    return atomic_write_text(run_dir / COMMAND_FILE, text, exclusive=True, mode=0o755)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


SWEEP_CLAIM = "multirun.yaml"  # a sweep dir's claim: the sweep's config, created exclusively (Hydra's basic
# sweeper writes the same config there again; under other sweepers it is the only copy)


def _holds_run(path: Path) -> bool:
    return (path / "metrics.json").exists() or (path / ".hydra").exists()


def _real(raw: str) -> Path:
    """The directory ``raw`` names once every ``..``, ``~`` and symlink is followed, as the OS will resolve it
    when Hydra writes there (``<new>/../<old>`` is ``<old>``, whether or not ``<new>`` exists yet)."""
    return Path(os.path.realpath(os.path.expanduser(raw)))


def _holds_sweep(path: Path) -> bool:
    return (path / SWEEP_CLAIM).exists() or (path.is_dir() and any(_holds_run(p) for p in path.iterdir()
                                                                    if p.is_dir()))


def _earlier(path: Path) -> Optional[tuple[str, Path]]:
    """("run" | "sweep", the dir) when ``path`` is, or lies inside, an earlier run or sweep; else None."""
    if _holds_run(path):
        return "run", path
    if _holds_sweep(path):
        return "sweep", path
    for p in path.parents:
        if _holds_run(p):
            return "run", p
        if (p / SWEEP_CLAIM).exists():
            return "sweep", p
    return None


def _refuse_earlier(path: Path, key: str, raw: str) -> None:
    found = _earlier(path)
    if found is None:
        return
    kind, where = found
    if where == path and kind == ("run" if key == "hydra.run.dir" else "sweep"):
        _fail(f"{path} already holds a {kind}; runs never overwrite each other (choose another {key}, "
              "or leave it out: the default is a new dir)")
    _fail(f"{key}={raw} is {'' if where == path else 'inside '}the earlier {kind} {where}; "
          "runs never write into each other")


def _usable(path: Path, key: str, raw: str) -> None:
    shown = f"{key}={raw}" + (f" ({path})" if str(path) != raw else "")
    if path.exists() and not path.is_dir():
        _fail(f"{shown} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"{shown} cannot be created: {e.strerror or e}")
    if not os.access(path, os.W_OK | os.X_OK):
        _fail(f"{shown} is not writable")


def _claim(marker: Path, make: Any, taken: str) -> None:
    """Create ``marker`` exclusively (``make``: os.mkdir, or an O_EXCL file): of two processes that passed the
    checks at once, one gets the dir and the other stops here, before Hydra writes anything."""
    try:
        make(marker)
    except FileExistsError:
        _fail(taken)


def _create_exclusive(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _recheck(raw: str, claimed: Path, key: str, marker: Path) -> None:
    """After the claim: ``raw`` still names the dir that was checked (no symlink swapped meanwhile); if not, the
    claim is taken back and nothing else is written."""
    now = _real(raw)
    if now != claimed:
        (marker.rmdir if marker.is_dir() else marker.unlink)()
        _fail(f"{key}={raw} changed while it was being claimed (now {now}, was {claimed}); nothing written")


def _job_dirs_inside(config: Any, sweep: Path) -> None:
    """Every job dir (``hydra.sweep.subdir``, normalised) lies inside the sweep dir: a subdir such as ``../x``
    or an absolute path would reach past the sweep's claim into another run. Checked for jobs 0 and 1 with
    the command line's values (a subdir that only the sweeper can resolve is left to it)."""
    for num in (0, 1):
        trial = copy.deepcopy(config)
        OmegaConf.set_readonly(trial, False)
        with open_dict(trial):
            trial.hydra.job.num = num
            trial.hydra.job.id = str(num)
        try:
            subdir = str(OmegaConf.select(trial, "hydra.sweep.subdir", throw_on_missing=True))
        except Exception:  # noqa: BLE001 - known to the sweeper only
            return
        job = _real(os.path.join(str(sweep), subdir))
        if job != sweep and sweep not in job.parents:  # the sweep dir itself: a subdir the sweeper fills in
            _fail(f"hydra.sweep.subdir={subdir} puts job {num} in {job}, outside the sweep dir {sweep}; "
                  "each job writes only inside its sweep")


def _guarded(key: str) -> Any:
    """Any error of a guard is one line on stderr and exit 1, never Hydra's warning plus a traceback (which
    Hydra prints when a callback raises, and then goes on into the dir anyway)."""
    def decorate(hook: Any) -> Any:
        def wrapper(self: Any, config: Any, **kwargs: Any) -> None:
            try:
                hook(self, config, **kwargs)
            except SystemExit:
                raise
            except OSError as e:
                hint = (" (a file or folder name is at most 255 bytes)" if e.errno == errno.ENAMETOOLONG else "")
                _fail(f"{key}: {e.strerror or e}{hint}" + (f": {e.filename}" if e.filename else ""))
            except Exception as e:  # noqa: BLE001 - one line, whatever it is
                _fail(f"{key}: {type(e).__name__}: {e}")
        wrapper.__name__ = hook.__name__
        return wrapper
    return decorate


class RunGuard(Callback):
    """Every run, sweep and job dir is normalised (``..``, ``~``, symlinks) before it is judged free, claimed
    exclusively, and checked again after the claim: no later run ever writes into an earlier one."""

    @_guarded("hydra.run.dir")
    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        raw = str(config.hydra.run.dir)
        path = _real(raw)
        taken = (f"{path} already holds a run; runs never overwrite each other (choose another hydra.run.dir, "
                 "or leave it out: the default is a new dir)")
        _refuse_earlier(path, "hydra.run.dir", raw)
        _usable(path, "hydra.run.dir", raw)
        _claim(path / ".hydra", os.mkdir, taken)  # Hydra writes its config into .hydra/ next
        _recheck(raw, path, "hydra.run.dir", path / ".hydra")

    @_guarded("hydra.sweep.dir")
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        raw = str(config.hydra.sweep.dir)
        path = _real(raw)
        taken = (f"{path} already holds a sweep; runs never overwrite each other (choose another "
                 "hydra.sweep.dir, or leave it out: the default is a new dir)")
        _refuse_earlier(path, "hydra.sweep.dir", raw)
        _job_dirs_inside(config, path)
        _usable(path, "hydra.sweep.dir", raw)
        _claim(path / SWEEP_CLAIM, lambda p: _create_exclusive(p, OmegaConf.to_yaml(config)), taken)
        _recheck(raw, path, "hydra.sweep.dir", path / SWEEP_CLAIM)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        """``command.sh`` in the job's dir, beside ``.hydra/overrides.yaml`` (a failure is a warning: the run goes
        on, its overrides are in .hydra/ anyway)."""
        try:
            write_command(config)
        except Exception as e:  # noqa: BLE001 - a convenience file never stops a run
            log.warning("%s not written: %s: %s", COMMAND_FILE, type(e).__name__, e)

    @_guarded("the sweep's summary")
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = _real(str(config.hydra.sweep.dir))
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
