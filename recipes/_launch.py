"""The process around one run: what ``run.py`` needs besides composing, validating and dispatching.

- the environment (:func:`set_up`): offline hubs, quiet tokenizers and W&B; the structured schema and the
  resolvers conf/ uses (``unique_dir``, ``ratio_tag``, ``metric_direction``, ``coalesce``);
- the command line: ``model=<path>`` becomes ``model=hf model.path=<path>`` (:func:`rewrite_model_args`); a
  launcher or sweeper plugin that is not installed is named before Hydra's own error (:func:`plugin_errors`);
  the config of every job a command line launches (:func:`compose_jobs`);
- one job (:class:`Job`): SIGTERM (SLURM's timeout and preemption signal) ends it as ``killed``, torch threads
  follow the launcher (:func:`job_threads`), the run record is opened with the job's W&B group
  (:func:`wandb_group`), and every failure is recorded in metrics.json with its exit code; in a sweep a failed
  job returns None, so one bad job does not stop the others.

The sweep's summary (results table, plots, report) is written by ``recipes._callbacks.RunGuard``.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from core.run.config import register_configs
from core.run.errors import ConfigError, RunDirError, UserError
from core.run.record import RunContext
from core.run.wandb_view import NO_VIEW, WandbView, sweep_group
from recipes import optimized_metric
from recipes._callbacks import claim_dir, ratio_tag

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
log = logging.getLogger("prunelab")


def set_up() -> None:
    """Environment and Hydra registrations of a prunelab process (idempotent)."""
    os.environ.setdefault("PRUNELAB_ROOT", str(ROOT))
    # Offline by construction: nothing is fetched from a hub at run time.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    # transformers reads a checkpoint's tensors on worker threads by default: several tensors in flight at once, a
    # load peak that varies from run to run. One at a time, the peak is the weights plus one tensor, as planned
    # (core/run/plan.py); HF_DEACTIVATE_ASYNC_LOAD=0 in the environment brings the threads back.
    os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
    register_configs()
    # The default run/sweep dirs (conf/hydra/default.yaml) are claimed with an exclusive mkdir; the cache keeps one
    # answer per config, and Hydra copies it into every job's config (joblib, submitit) so all agree on the dir.
    OmegaConf.register_new_resolver("unique_dir", claim_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("ratio_tag", ratio_tag, replace=True)  # 0.2 -> "2000" (the seed's folder names)
    # ${metric_direction:${task},${optimized_metric.name},${optimized_metric.direction}}: what a sweeper optimises
    OmegaConf.register_new_resolver("metric_direction", metric_direction, replace=True)
    # ${coalesce:${run_name},${hydra:job.num}}: the first value that is set (a sweep subdir named by its preset)
    OmegaConf.register_new_resolver("coalesce", lambda *values: next((v for v in values if v is not None), None),
                                    replace=True)


def metric_direction(task: str, name: Optional[str], direction: Optional[str]) -> str:
    """The ``metric_direction`` resolver: the direction a sweeper optimises (``hydra.sweeper.direction`` of
    multirun_sweeps/optuna_*.yaml), the one the task's recipe declares for ``optimized_metric``, never a guess.
    A missing or contradicting choice fails at composition, before any trial runs."""
    recipe = importlib.import_module(f"recipes.{task}")
    chosen = OmegaConf.create({"task": task, "optimized_metric": {"name": name, "direction": direction}})
    target = optimized_metric(chosen, recipe)
    if target is None:
        raise ConfigError(f"task={task} reports no metric a sweeper could optimise")
    return target[1]


# --- the command line ---------------------------------------------------------------------------------------

def rewrite_model_args(argv: list[str], conf_dir: Path = CONF_DIR) -> list[str]:
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


def _requested_plugins(argv: list[str], conf_dir: Path = CONF_DIR) -> list[tuple[str, str]]:
    """(group, option) of every ``hydra/launcher`` / ``hydra/sweeper`` choice on the command line or in the
    defaults of the primary config file (``-cd``/``-cn``); a preset of conf/hydra/<group>/ is followed to the
    plugin option it extends (``hydra/launcher=slurm_gpu`` -> submitit_slurm)."""
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
    errors = []
    for group, option in _requested_plugins(argv):
        module, package = PLUGINS.get((group, option), (None, None))
        if module and importlib.util.find_spec(module) is None:
            errors.append(f"hydra/{group}={option} needs the Hydra plugin {package}, which is not installed "
                          f"(pip install {package})")
    return errors


@dataclass
class Command:
    """A ``python run.py ...`` command line, as Hydra's own parser splits it."""

    config_dir: Path = CONF_DIR
    config_name: str = "config"
    multirun: bool = False
    overrides: list[str] = field(default_factory=list)


def parse_command(argv: list[str]) -> Command:
    """``-m``, ``-cd DIR``, ``-cn NAME``, ``-cp PATH`` (and their long forms) and the overrides of a run.py
    command line. Flags that print instead of running (``--cfg``, ``--help``) are errors."""
    cmd, args = Command(), list(argv)
    while args:
        arg = args.pop(0)
        flag, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if flag in ("-m", "--multirun"):
            cmd.multirun = True
        elif flag in ("-cd", "--config-dir", "-cn", "--config-name", "-cp", "--config-path"):
            if not eq:
                if not args:
                    raise ConfigError(f"{flag} needs a value")
                value = args.pop(0)
            if flag in ("-cn", "--config-name"):
                cmd.config_name = value.removesuffix(".yaml")
            else:  # -cp is relative to run.py, -cd to the working directory
                cmd.config_dir = (ROOT / value) if flag in ("-cp", "--config-path") else Path(value).resolve()
        elif arg.startswith("-"):
            raise ConfigError(f"{arg}: not a flag of a run (-m, -cd, -cn, -cp)")
        else:
            cmd.overrides.append(arg)
    return cmd


def sweep_jobs(params: dict[str, Any], overrides: list[str]) -> list[list[str]]:
    """The override list of every job Hydra's basic sweeper launches for a sweep file's
    ``hydra.sweeper.params`` and the command line's overrides (``ratio=0.1,0.2`` sweeps too)."""
    parsed = OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in params.items()), *overrides])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose_jobs(argv: list[str]) -> list[DictConfig]:
    """The config of every job ``python run.py <argv>`` would run (one, unless it sweeps), composed with Hydra's
    compose API as run.py's ``@hydra.main`` composes it (``model=<path>`` rewritten, plugins checked first).

    A sweep is expanded as Hydra's basic sweeper does (``-m ratio=0.1,0.2``, a sweep file's
    ``hydra.sweeper.params``); under another sweeper (Optuna) the search space is the sweeper's: the job is
    composed with the command line's overrides only, and the study's ``direction`` is resolved."""
    set_up()
    argv = rewrite_model_args(argv)
    for message in plugin_errors(argv):
        raise ConfigError(message)
    cmd = parse_command(argv)
    extra = [] if cmd.config_dir == CONF_DIR else [f"hydra.searchpath=[file://{CONF_DIR}]"]  # -cd: conf/ too
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(cmd.overrides)
    for o in parsed:  # as Hydra refuses them: a sweep is over the job's config, never over Hydra's own
        if o.is_sweep_override() and o.get_key_element().startswith("hydra."):
            raise ConfigError(f"{o.input_line}: sweeping over Hydra's configuration is not supported; "
                              f"sweep the job's key instead (e.g. {o.get_key_element().split('.')[-1]}=...)")
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    # Hydra resolves the run and sweep dirs while it merges a sweep file: here they are named, never created
    OmegaConf.register_new_resolver("unique_dir", str, replace=True)
    try:
        with initialize_config_dir(config_dir=str(cmd.config_dir), version_base="1.3"):
            jobs = [cmd.overrides]
            top = compose(cmd.config_name, overrides=[*extra, *fixed], return_hydra_config=True)
            if cmd.multirun or top.hydra.mode == RunMode.MULTIRUN:
                OmegaConf.select(top, "hydra.sweeper.direction")  # an Optuna study's (the metric_direction resolver)
                basic = str(top.hydra.sweeper._target_).endswith(".BasicSweeper")
                jobs = sweep_jobs(dict(top.hydra.sweeper.params or {}) if basic else {}, cmd.overrides)
            return [compose(cmd.config_name, overrides=[*extra, *job]) for job in jobs]
    finally:
        GlobalHydra.instance().clear()
        OmegaConf.register_new_resolver("unique_dir", claim_dir, use_cache=True, replace=True)


# --- one job ------------------------------------------------------------------------------------------------

class Terminated(BaseException):
    """SIGTERM (SLURM's timeout and preemption signal, `kill`): the run is recorded as killed."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")
        self.signum = signum


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


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


def set_threads(threads: Optional[int]) -> None:
    """torch's intra-op threads (``runtime.threads``; None: torch's default) and no tokenizers fork warning."""
    import torch  # local: this module is imported while validating the config

    if threads:
        torch.set_num_threads(int(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def set_mmap_threshold(mib: Optional[float]) -> bool:
    """Serve CPU allocations of at least ``mib`` MiB with mmap, so that freeing them returns memory at once.

    glibc raises its mmap threshold dynamically (up to 32 MiB) once large blocks have been freed. After that,
    freed activations, logits and pruned weights stay in the heap: they count in RSS and fragment it.
    A fixed threshold keeps peak RSS close to the memory actually in use. On SmolLM2 pruning, with
    perplexity measured before it, a 1 MiB threshold takes peak RSS from 1.76-1.80 to 1.61 GiB; the time
    difference is within this machine's noise.
    It is a no-op without glibc (macOS, musl), or for ``None``/0. Returns whether it was applied.
    """
    if not mib:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, int(mib * 2**20)))
    except (OSError, AttributeError):
        return False


def _startup_seconds() -> Optional[float]:
    """Seconds since this process started. On Linux from its start time in clock ticks since boot
    (/proc/self/stat) against CLOCK_BOOTTIME: exact to a tick. psutil's create_time adds the boot time, which
    /proc/stat gives in whole seconds, so it can be off by up to a second; it is the fallback elsewhere."""
    try:
        if sys.platform.startswith("linux"):
            fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            ticks = int(fields[19])  # starttime: field 22 of proc(5), the 20th after the ")" of comm
            return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a timing, never a reason to fail
        return None


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def wandb_group(cfg: DictConfig) -> Optional[str]:
    """The W&B group of this job: ``logger.group`` when set; in a multirun the sweep's, from ``hydra.sweep.dir``
    (``core.run.wandb_view.sweep_group``: ``multirun/2026-11-24/10-00-00`` -> ``sweep-2026-11-24_10-00-00``), the
    same for every job of the sweep whatever its launcher; a single run: none."""
    if cfg.logger.group:
        return str(cfg.logger.group)
    if not _multirun():
        return None
    return sweep_group(HydraConfig.get().sweep.dir, cfg.paths.outputs_root)


class Job:
    """One run in its Hydra run dir. ``with Job(cfg) as job:`` catches SIGTERM while the body runs; a failure
    of the body (any exception, SIGTERM, Ctrl-C) is recorded in metrics.json and logged in one line (a bug: its
    traceback, once), then ends the process with its code (failed 1, killed 128 + signal, interrupted 130) or,
    a failed job of a sweep, is swallowed so the sweep goes on."""

    def __init__(self, cfg: DictConfig):
        self.run_dir = Path(cfg.paths.output_dir)
        self.task = str(cfg.task)
        self.multirun = _multirun()
        self.launcher = OmegaConf.to_container(HydraConfig.get().launcher) if HydraConfig.initialized() else {}
        self.ctx: Optional[RunContext] = None
        self.startup = _startup_seconds()
        self._previous: Any = None

    def __enter__(self) -> "Job":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _raise_terminated)
        self.start_unix, self.t0 = time.time(), time.perf_counter()
        return self

    def refuse_a_used_dir(self) -> None:
        if (self.run_dir / "metrics.json").exists():
            raise RunDirError(f"{self.run_dir} already holds a run; runs never overwrite each other")

    def open_record(self, cfg: DictConfig, wandb_view: WandbView = NO_VIEW) -> RunContext:
        """torch threads and memory settings, then the run record: config, start-up timings, runtime."""
        set_threads(job_threads(cfg.runtime.threads, self.launcher))
        set_mmap_threshold(cfg.runtime.mmap_threshold_mb)
        container = OmegaConf.to_container(cfg, resolve=True)
        self.ctx = ctx = RunContext(self.run_dir, task=self.task, config=container, logger=cfg.logger.name,
                                    wandb_project=cfg.logger.project, wandb_mode=cfg.logger.mode,
                                    wandb_group=wandb_group(cfg), wandb_tags=list(cfg.logger.tags),
                                    wandb_log_model=bool(cfg.logger.log_model), run_name=cfg.run_name,
                                    wandb_view=wandb_view)
        ctx.log("config", container)
        ctx.log("timings", {"startup_s": self.startup, "validate_s": time.perf_counter() - self.t0,
                            "job_start_unix": self.start_unix})
        import torch  # local: this module is imported while validating the config

        ctx.log("runtime", {"threads": torch.get_num_threads(), "pid": os.getpid(),
                            "launcher": str(self.launcher.get("_target_") or "").rsplit(".", 1)[-1] or None})
        return ctx

    def finish(self) -> None:
        assert self.ctx is not None
        self.ctx.log("timings", {"job_end_unix": time.time()})
        self.ctx.finish("completed")
        log.info("run dir: %s", self.run_dir.resolve())

    def __exit__(self, kind: Any, e: Optional[BaseException], tb: Any) -> bool:
        try:
            if e is None:
                return False
            status, code = "failed", 1
            if isinstance(e, Terminated):
                status, code = "killed", 128 + e.signum
            elif isinstance(e, KeyboardInterrupt):
                status, code = "interrupted", 130
            _record_end(self.ctx, self.run_dir, self.task, status, e)
            if isinstance(e, (UserError, Terminated, KeyboardInterrupt)):
                log.error("%s", e if str(e) else type(e).__name__)
            else:  # a bug: its traceback, printed once
                log.error("run failed: %s: %s", type(e).__name__, e, exc_info=(kind, e, tb))
            if self.multirun and status == "failed":
                return True  # one bad job must not kill the sweep (the sweep's exit code reports it)
            raise SystemExit(code) from None
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)
            if self.multirun:  # a reused worker (joblib, the basic launcher) runs the next job without this one's model
                self.ctx = None
                if tb is not None:
                    traceback.clear_frames(tb)  # the failed recipe's locals (its model) go now, not with the traceback
                gc.collect()


def _record_end(ctx: Optional[RunContext], run_dir: Path, task: str, status: str, error: BaseException) -> None:
    """Write the final status; never over another run's record, and never a second traceback if the disk is
    full (then the record keeps ``running`` with a pid that is gone, which readers report as ``dead``)."""
    try:
        if ctx is None:
            if (run_dir / "metrics.json").exists():
                return  # someone else's record: leave it as it is
            ctx = RunContext(run_dir, task=task, logger="none", heartbeat_s=None)
        ctx.finish(status, error)
    except (OSError, UserError) as e2:
        print(f"error: the run's end ({status}) could not be recorded in {run_dir / 'metrics.json'}: {e2}",
              file=sys.stderr, flush=True)


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """Python's cyclic collector paused while torch / transformers are imported: their ~400k objects live until exit,
    and each collection that the import triggers walks all of them again (about a tenth of the import time). Nothing
    is lost: what an import leaves in cycles is collected once the collector is back on. Restores the state it found."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def fast_exit(code: int = 0) -> None:
    """Leave without the interpreter's module teardown (1-1.5 s with torch loaded); everything is written already:
    records and checkpoints atomically, W&B finished by the run record, log handlers flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
