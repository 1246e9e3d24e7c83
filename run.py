"""prunelab entry point: compose the config, validate it, run one recipe, return the sweep metric.

    python run.py                                   # prune SmolLM2 (taylor, ratio 0.25), evaluate, save
    python run.py pruner=l2 ratio=0.3 layers=all    # any group option / key from conf/
    python run.py task=evaluate model=/path/to/ckpt eval=zeroshot
    python run.py -m ratio=0.1,0.2,0.3 pruner=taylor,l1      # multirun sweep

``task=X`` runs ``recipes/X.py``; its ``run`` returns named metrics, and ``optimized_metric.name`` picks the
one returned to a sweeper (its direction is checked against the recipe's ``METRICS``). torch and
transformers are imported only once the config is valid, so a bad config is reported in Hydra's time.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PRUNELAB_ROOT", str(ROOT))
# Offline by construction: nothing is fetched from a hub at run time.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from core.config import register_configs, validate  # noqa: E402
from core.errors import ConfigError, RunDirError, UserError  # noqa: E402
from recipes import task_names  # noqa: E402
from recipes._callbacks import claim_dir, ratio_tag  # noqa: E402

log = logging.getLogger("prunelab")
register_configs()
# The default run/sweep dirs (conf/hydra/default.yaml) are claimed with an exclusive mkdir; the cache keeps one
# answer per config, and Hydra copies it into every job's config (joblib, submitit) so all agree on the dir.
OmegaConf.register_new_resolver("unique_dir", claim_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("ratio_tag", ratio_tag, replace=True)  # 0.2 -> "2000" (the seed's folder names)
# ${metric_direction:${task},${optimized_metric.name},${optimized_metric.direction}}: what a sweeper optimises
OmegaConf.register_new_resolver("metric_direction", lambda *args: metric_direction(*args), replace=True)
# ${coalesce:${run_name},${hydra:job.num}}: the first value that is set (a sweep subdir named by its preset)
OmegaConf.register_new_resolver("coalesce", lambda *values: next((v for v in values if v is not None), None),
                                replace=True)


class Terminated(BaseException):
    """SIGTERM (SLURM's timeout and preemption signal, `kill`): the run is recorded as killed."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")
        self.signum = signum


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def rewrite_model_args(argv: list[str], conf_dir: Path = ROOT / "conf") -> list[str]:
    """``model=<path>`` (not an option of conf/model/) -> ``model=hf model.path=<path>``.

    The path is quoted for Hydra's override grammar, so spaces and any other character a filesystem
    allows pass through unchanged.
    """
    options = {p.stem for p in (conf_dir / "model").glob("*.yaml")}
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key == "model" and value not in options and ("/" in value or Path(value).exists()):
            path = Path(value).expanduser().resolve()
            out += ["model=hf", f"model.path={_quote(str(path))}", f"model.name={_quote(path.name)}"]
        else:
            out.append(arg)
    return out


def _quote(s: str) -> str:
    """A Hydra override value that is exactly ``s`` (single-quoted; backslashes and quotes escaped)."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def load_recipe(task: str) -> Any:
    """``recipes.<task>``; an unknown task is a ConfigError naming the ones there are."""
    if task not in task_names():
        raise ConfigError(f"task={task!r} is not one of {', '.join(task_names())}")
    return importlib.import_module(f"recipes.{task}")


def check(cfg: DictConfig) -> Any:
    """Every problem of ``cfg`` at once (core groups, the task's own checks, the optimised metric)."""
    errors = validate(cfg)
    try:
        recipe = load_recipe(str(cfg.task))
    except ConfigError as e:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join([str(e), *errors])) from None
    errors += recipe.validate(cfg)
    try:
        optimized_metric(cfg, recipe)
    except ConfigError as e:
        errors.append(str(e))
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return recipe


def optimized_metric(cfg: DictConfig, recipe: Any) -> Optional[tuple[str, str]]:
    """(name, direction) of the number returned to a sweeper: ``optimized_metric`` or the task's first metric,
    in the direction the recipe declares for it (a contradicting direction is an error); None if none."""
    name, direction = cfg.optimized_metric.name, cfg.optimized_metric.direction
    if not recipe.METRICS:
        return None
    name = name or next(iter(recipe.METRICS))
    if name not in recipe.METRICS:
        raise ConfigError(f"optimized_metric.name={name!r}: task={cfg.task} reports {', '.join(recipe.METRICS)}")
    if direction is not None and recipe.METRICS[name] != direction:
        raise ConfigError(f"optimized_metric: {name} is to {recipe.METRICS[name]}, not {direction} "
                          f"(set optimized_metric.direction={recipe.METRICS[name]})")
    return name, recipe.METRICS[name]


def metric_direction(task: str, name: Optional[str], direction: Optional[str]) -> str:
    """The ``metric_direction`` resolver: the direction a sweeper optimises (``hydra.sweeper.direction`` of
    multirun_sweeps/optuna_*.yaml), the one the task's recipe declares for ``optimized_metric``, never a guess.
    A missing or contradicting choice fails at composition, before any trial runs."""
    import importlib

    from omegaconf import OmegaConf as _OC

    recipe = importlib.import_module(f"recipes.{task}")
    target = optimized_metric(_OC.create({"task": task, "optimized_metric": {"name": name, "direction": direction}}),
                              recipe)
    if target is None:
        raise ConfigError(f"task={task} reports no metric a sweeper could optimise")
    return target[1]


# Hydra plugins a command line or sweep file may ask for: (group, option) -> (module, pip package)
PLUGINS = {
    ("launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    ("launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("launcher", "ray"): ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
    ("launcher", "ray_aws"): ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
    ("launcher", "rq"): ("hydra_plugins.hydra_rq_launcher", "hydra-rq-launcher"),
    ("sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    ("sweeper", "ax"): ("hydra_plugins.hydra_ax_sweeper", "hydra-ax-sweeper"),
    ("sweeper", "nevergrad"): ("hydra_plugins.hydra_nevergrad_sweeper", "hydra-nevergrad-sweeper"),
}


def _requested_plugins(argv: list[str], conf_dir: Path = ROOT / "conf") -> list[tuple[str, str]]:
    """(group, option) of every ``hydra/launcher`` / ``hydra/sweeper`` choice on the command line or in the
    defaults of the primary config file (``-cd``/``-cn``); a preset of conf/hydra/<group>/ is followed to the
    plugin option it extends (``hydra/launcher=slurm_gpu`` -> submitit_slurm)."""
    import re

    choices: list[tuple[str, str]] = []
    pattern = re.compile(r"^\s*-?\s*(?:override\s+)?/?hydra/(launcher|sweeper)\s*[:=]\s*([\w.-]+)")
    for arg in argv:
        m = pattern.match(arg.lstrip("+~"))
        if m:
            choices.append((m.group(1), m.group(2)))
    cdir, cname = None, None
    for i, arg in enumerate(argv):
        for short, long_ in (("-cd", "--config-dir"), ("-cn", "--config-name"), ("-cp", "--config-path")):
            value = argv[i + 1] if arg == short and i + 1 < len(argv) else (
                arg.split("=", 1)[1] if arg.startswith(long_ + "=") else None)
            if value is not None:
                if short == "-cn":
                    cname = value
                else:
                    cdir = value
    if cname:
        file = Path(cdir or conf_dir) / (cname if cname.endswith(".yaml") else f"{cname}.yaml")
        try:
            choices += [(m.group(1), m.group(2)) for line in file.read_text().splitlines()
                        if (m := pattern.match(line))]
        except OSError:
            pass  # Hydra reports a missing config in its own words
    followed = []
    for group, option in choices:
        preset = conf_dir / "hydra" / group / f"{option}.yaml"
        if (group, option) not in PLUGINS and preset.is_file():
            for line in preset.read_text().splitlines():
                m = re.match(r"^\s*-\s*([\w.-]+)\s*$", line)
                if m and (group, m.group(1)) in PLUGINS:
                    option = m.group(1)
        followed.append((group, option))
    return followed


def plugin_errors(argv: list[str]) -> list[str]:
    """One line per requested Hydra plugin that is not installed, naming its pip package."""
    import importlib.util

    errors = []
    for group, option in _requested_plugins(argv):
        module, package = PLUGINS.get((group, option), (None, None))
        if module and importlib.util.find_spec(module) is None:
            errors.append(f"hydra/{group}={option} needs the Hydra plugin {package}, which is not installed "
                          f"(pip install {package})")
    return errors


def job_threads(requested: Optional[int], launcher: Any, cpus: Optional[int] = None) -> Optional[int]:
    """torch threads for one job: ``runtime.threads`` when set; under the joblib launcher the machine's cores
    shared by its parallel jobs (two jobs on two cores: one thread each, never 2 x 2); under submitit the
    job's ``cpus_per_task``; otherwise None (torch's default, all cores; the basic launcher runs one job at a
    time)."""
    if requested:
        return int(requested)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    target = str((launcher or {}).get("_target_") or "")
    if "joblib" in target.lower():
        n = int((launcher or {}).get("n_jobs") or -1)
        n = cpus + 1 + n if n < 0 else n  # joblib: -1 = all cores, -2 = all but one
        return max(1, cpus // max(1, n))
    if (launcher or {}).get("cpus_per_task"):  # submitit (local, SLURM), or any launcher that reserves cores
        return int(launcher["cpus_per_task"])
    return None


def _startup_seconds() -> Optional[float]:
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a timing, never a reason to fail
        return None


def wandb_group(cfg: DictConfig) -> Optional[str]:
    """The W&B group of this job: ``logger.group`` when set; in a multirun the sweep's, from ``hydra.sweep.dir``
    (``core.wandb_view.sweep_group``: ``multirun/2026-11-24/10-00-00`` -> ``sweep-2026-11-24_10-00-00``), the same for
    every job of the sweep whatever its launcher; a single run: none."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from core.wandb_view import sweep_group

    if cfg.logger.group:
        return str(cfg.logger.group)
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    return sweep_group(HydraConfig.get().sweep.dir, cfg.paths.outputs_root)


def run(cfg: DictConfig) -> Optional[float]:
    """Validate, run ``cfg.task`` in the Hydra run dir, record the outcome in metrics.json."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from core.record import RunContext

    run_dir = Path(cfg.paths.output_dir)
    task = str(cfg.task)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    launcher = OmegaConf.to_container(HydraConfig.get().launcher) if HydraConfig.initialized() else {}
    ctx = None
    startup = _startup_seconds()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    job_start_unix = time.time()
    try:
        t0 = time.perf_counter()
        if (run_dir / "metrics.json").exists():
            raise RunDirError(f"{run_dir} already holds a run; runs never overwrite each other")
        recipe = check(cfg)
        from core.models import set_mmap_threshold, set_threads

        threads = job_threads(cfg.runtime.threads, launcher)
        set_threads(threads)
        set_mmap_threshold(cfg.runtime.mmap_threshold_mb)
        container = OmegaConf.to_container(cfg, resolve=True)
        ctx = RunContext(run_dir, task=task, config=container, logger=cfg.logger.name,
                         wandb_project=cfg.logger.project, wandb_mode=cfg.logger.mode,
                         wandb_group=wandb_group(cfg), wandb_tags=list(cfg.logger.tags),
                         wandb_log_model=bool(cfg.logger.log_model), run_name=cfg.run_name)
        ctx.log("config", container)
        ctx.log("timings", {"startup_s": startup, "validate_s": time.perf_counter() - t0,
                            "job_start_unix": job_start_unix})
        import torch

        ctx.log("runtime", {"threads": torch.get_num_threads(), "pid": os.getpid(),
                            "launcher": str(launcher.get("_target_") or "").rsplit(".", 1)[-1] or None})
        metrics = recipe.run(cfg, ctx) or {}
        target = optimized_metric(cfg, recipe)
        value = metrics.get(target[0]) if target else None
        ctx.log("metrics", metrics)
        ctx.log("optimized_metric", {"name": target[0], "direction": target[1], "value": value} if target else None)
        if target and value is None:
            log.warning("optimized_metric %s was not measured by this run (returned None to the sweeper)", target[0])
        ctx.log("timings", {"job_end_unix": time.time()})
        ctx.finish("completed")
        log.info("run dir: %s", run_dir.resolve())
        return None if value is None else float(value)
    except BaseException as e:  # noqa: BLE001 - every failure is recorded in metrics.json
        status, code = "failed", 1
        if isinstance(e, Terminated):
            status, code = "killed", 128 + e.signum
        elif isinstance(e, KeyboardInterrupt):
            status, code = "interrupted", 130
        _record_end(ctx, run_dir, task, status, e)
        if isinstance(e, (UserError, Terminated, KeyboardInterrupt)):
            log.error("%s", e if str(e) else type(e).__name__)
        else:
            log.exception("run failed: %s: %s", type(e).__name__, e)  # a bug: its traceback, printed once
        if multirun and status == "failed":
            return None  # one bad job must not kill the sweep (the sweep's exit code reports it)
        raise SystemExit(code) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if multirun:  # a reused worker (joblib, the basic launcher) starts the next job without this one's model
            ctx = None
            import gc

            gc.collect()


def _record_end(ctx: Any, run_dir: Path, task: str, status: str, error: BaseException) -> None:
    """Write the final status; never over another run's record, and never a second traceback if the disk is
    full (then the record keeps ``running`` with a pid that is gone, which readers report as ``dead``)."""
    from core.record import RunContext

    try:
        if ctx is None:
            if (run_dir / "metrics.json").exists():
                return  # someone else's record: leave it as it is
            ctx = RunContext(run_dir, task=task, logger="none", heartbeat_s=None)
        ctx.finish(status, error)
    except (OSError, UserError) as e2:
        print(f"error: the run's end ({status}) could not be recorded in {run_dir / 'metrics.json'}: {e2}",
              file=sys.stderr, flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    return run(cfg)


def _fast_exit(code: int = 0) -> None:
    """Leave without the interpreter's module teardown (1-1.5 s with torch loaded); everything is written already:
    records and checkpoints atomically, W&B finished by the run record, log handlers flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.argv = [sys.argv[0]] + rewrite_model_args(sys.argv[1:])
    for _message in plugin_errors(sys.argv[1:]):  # before Hydra's "Could not find 'hydra/launcher/joblib'"
        print(f"error: {_message}", file=sys.stderr, flush=True)
        _fast_exit(1)
    main()
    _fast_exit(0)
