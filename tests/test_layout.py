"""Guards of the layout (README, "Design"): who may import whom, and every option one hop from its code."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from conftest import ROOT

LIBRARIES = ("core", "pruning", "replacement", "recovery", "analysis", "export")
# package -> top-level modules it must never import
NEVER = {
    "core": {"pruning", "replacement", "recovery", "analysis", "export", "recipes", "run"},
    "pruning": {"analysis", "replacement", "recovery", "export", "recipes", "run"},
    "replacement": {"pruning", "analysis", "recovery", "export", "recipes", "run"},
    "recovery": {"pruning", "analysis", "replacement", "export", "recipes", "run"},
    "analysis": {"pruning", "replacement", "recovery", "export", "recipes", "run"},
    "export": {"pruning", "analysis", "replacement", "recovery", "recipes", "run"},
}
CONFIG_LIBS = {"omegaconf", "hydra"}  # only recipes/ and run.py see the config (core/config.py: the schema)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
    return out


def _files(pkg: str) -> list[Path]:
    d = ROOT / pkg
    return sorted(d.rglob("*.py")) if d.is_dir() else []


@pytest.mark.parametrize("pkg", LIBRARIES)
def test_packages_never_import_siblings_or_recipes(pkg):
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in _files(pkg) for line, mod in _imports(f)
           if mod.split(".")[0] in NEVER[pkg]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", LIBRARIES)
def test_only_recipes_see_the_config(pkg):
    allowed = {ROOT / "core" / "config.py"}  # the structured schema registers itself with Hydra
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in _files(pkg) if f not in allowed
           for line, mod in _imports(f) if mod.split(".")[0] in CONFIG_LIBS]
    assert not bad, "\n".join(bad)


def test_config_errors_need_no_torch():
    """run.py validates before torch/transformers are imported (a bad config is reported in Hydra's time)."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from conftest import compose; "
            "import run; cfg = compose(['pruner=taylor', 'eval=quick'], Path('unused')); run.check(cfg); "
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib', 'wandb', 'lm_eval', 'datasets') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def _yaml_target(path: Path) -> str | None:
    """The option's _target_, following `defaults: [other]` inside the same group."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if "_target_" in data:
        return data["_target_"]
    for d in data.get("defaults") or []:
        if isinstance(d, str) and d != "_self_" and (path.parent / f"{d}.yaml").is_file():
            return _yaml_target(path.parent / f"{d}.yaml")
    return None


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "pruner").glob("*.yaml")))
def test_every_pruner_option_names_its_code(name):
    """pruner=X -> conf/pruner/X.yaml -> its _target_, one importable class."""
    target = _yaml_target(ROOT / "conf" / "pruner" / f"{name}.yaml")
    assert target, f"conf/pruner/{name}.yaml names no code"
    module, _, cls = target.rpartition(".")
    assert module.startswith("pruning."), target
    assert hasattr(importlib.import_module(module), cls), target


@pytest.mark.parametrize("task", __import__("recipes").task_names())
def test_every_recipe_has_the_interface(task):
    from core.config import DIRECTIONS

    mod = importlib.import_module(f"recipes.{task}")
    assert callable(mod.run) and callable(mod.validate), task
    assert isinstance(mod.METRICS, dict) and set(mod.METRICS.values()) <= set(DIRECTIONS), mod.METRICS
