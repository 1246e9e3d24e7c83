"""prunelab entry point: compose the config, validate it, run one recipe, return the sweep metric.

    python run.py                                   # prune SmolLM2 (obs, compensated; ratio 0.25), evaluate, save
    python run.py pruner=l2 ratio=0.3 layers=all    # any group option / key from conf/
    python run.py task=evaluate model=/path/to/ckpt eval=zeroshot
    python run.py -m ratio=0.1,0.2,0.3 pruner=taylor,l1      # multirun sweep

``task=X`` runs ``recipes/X.py``; its ``run`` returns named metrics, and ``optimized_metric.name`` picks the
one returned to a sweeper (its direction is checked against the recipe's ``METRICS``). torch and
transformers are imported only once the config is valid, so a bad config is reported in Hydra's time.
:func:`compose_and_validate` does everything before the run for a command line, without running it.
The process around a run (environment, resolvers, signals, threads, failure records) is ``recipes/_launch.py``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from core.run.config import output_name_errors, validate
from core.run.errors import ConfigError
from core.run.wandb_view import NO_VIEW
from recipes import load_recipe, optimized_metric
from recipes._launch import (Job, compose_jobs, fast_exit, imports_without_gc, plugin_errors, rewrite_model_args,
                            set_up)
from recipes._plan import dry_run, enforce, prepare

log = logging.getLogger("prunelab")
set_up()  # offline environment, the schema and the resolvers conf/ uses


def check(cfg: DictConfig) -> Any:
    """Every problem of ``cfg`` at once (core groups, the task's own checks, the optimised metric); the recipe."""
    errors = validate(cfg)
    try:
        recipe = load_recipe(str(cfg.task))
    except ConfigError as e:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join([str(e), *errors])) from None
    errors += recipe.validate(cfg)
    if cfg.get("output_name") is not None:  # the folder name of the tasks that declare OUTPUT_NAME; refused elsewhere
        errors += output_name_errors(cfg.output_name) if getattr(recipe, "OUTPUT_NAME", False) else [
            f"output_name={cfg.output_name}: task={cfg.task} writes no named results folder (replace, convert and "
            "batch_analyze do); leave it out"]
    try:
        optimized_metric(cfg, recipe)
    except ConfigError as e:
        errors.append(str(e))
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return recipe


def compose_and_validate(argv: list[str]) -> list[DictConfig]:
    """The config of every job ``python run.py <argv>`` would run (one, unless it sweeps), composed and checked
    as :func:`run` checks it, without running anything. A bad command line raises what run.py reports: a
    ConfigError, or Hydra's own error for an unknown option or key."""
    configs = compose_jobs(argv)
    for cfg in configs:
        check(cfg)
    return configs


def run(cfg: DictConfig) -> Optional[float]:
    """Validate, run ``cfg.task`` in the Hydra run dir, record the outcome in metrics.json; the optimised metric."""
    with Job(cfg) as job:  # SIGTERM; every failure recorded in metrics.json, then exit (a sweep's job: None)
        job.refuse_a_used_dir()
        with imports_without_gc():  # validation, the plan and the record import torch (and transformers)
            recipe = check(cfg)
            plan = prepare(cfg, recipe)  # model.device=auto resolved, devices checked, the plan: no weight read
            if cfg.dry_run:
                return dry_run(job, cfg, plan)  # printed and recorded (status dry_run); nothing loaded
            ctx = job.open_record(cfg, getattr(recipe, "WANDB_VIEW", NO_VIEW))  # torch is imported here
        enforce(cfg, plan, ctx)  # a run predicted not to fit stops here (plan.force=true runs it anyway)
        metrics = recipe.run(cfg, ctx) or {}
        target = optimized_metric(cfg, recipe)
        value = metrics.get(target[0]) if target else None
        ctx.log("metrics", metrics)
        ctx.log("optimized_metric", {"name": target[0], "direction": target[1], "value": value} if target else None)
        if target and value is None:
            log.warning("optimized_metric %s was not measured by this run (returned None to the sweeper)", target[0])
        job.finish()
        return None if value is None else float(value)
    return None  # a failed job of a sweep: the sweep goes on (its exit code reports the failure)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    return run(cfg)


if __name__ == "__main__":
    sys.argv = [sys.argv[0]] + rewrite_model_args(sys.argv[1:])
    for _message in plugin_errors(sys.argv[1:]):  # before Hydra's "Could not find 'hydra/launcher/joblib'"
        print(f"error: {_message}", file=sys.stderr, flush=True)
        fast_exit(1)
    main()
    fast_exit(0)
