"""Recipes: ``task=X`` runs ``recipes/X.py``. The only code that reads the config.

A recipe module has
    METRICS: dict[str, str]          the numbers ``run`` returns, each with its direction (minimize | maximize)
    validate(cfg) -> list[str]       checks only this task needs (no weights loaded); all problems at once
    run(cfg, ctx) -> dict            reads top to bottom: load, compute with plain-argument library calls, record
``run.py`` returns ``run(...)[cfg.optimized_metric.name]`` to a sweeper. Helpers shared by recipes live in
``recipes/_common.py`` (a leading underscore is not a task).
"""

from __future__ import annotations

from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent


def task_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.py") if not p.stem.startswith("_"))
