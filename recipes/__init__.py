"""Recipes: ``task=X`` runs ``recipes/X.py``. The only code that reads the config.

A recipe module has
    METRICS: dict[str, str]          the numbers ``run`` returns, each with its direction (minimize | maximize)
    validate(cfg) -> list[str]       checks only this task needs (no weights loaded); all problems at once
    run(cfg, ctx) -> dict            reads top to bottom: load, compute with plain-argument library calls, record
    WANDB_VIEW (optional)            a ``core.run.wandb_view.WandbView``: where the task's W&B ``method`` and
                                     ``layer_range`` come from when its record does not say
    plan(cfg) -> Plan (optional)     a task that loads a model: what it would hold, without weights
                                     (recipes/_plan.py); ``dry_run=true`` prints it, a run checks it before loading
``run.py`` returns ``run(...)[cfg.optimized_metric.name]`` to a sweeper (:func:`optimized_metric`). Helpers shared
by recipes live in ``recipes/_common.py``; the process around a run (environment, signals, threads, command
line) in ``recipes/_launch.py`` (a leading underscore is not a task).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

from core.run.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parent


def task_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_recipe(task: str) -> Any:
    """``recipes.<task>``; an unknown task is a ConfigError naming the ones there are."""
    if task not in task_names():
        raise ConfigError(f"task={task!r} is not one of {', '.join(task_names())}")
    return importlib.import_module(f"recipes.{task}")


def optimized_metric(cfg: Any, recipe: Any) -> Optional[tuple[str, str]]:
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
