"""Guards of the layout (README, "Design"): who may import whom, no import circle, and every option one hop from
its code."""

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
CONFIG_LIBS = {"omegaconf", "hydra"}  # only recipes/ and run.py see the config (core/run/config.py: the schema)


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
    allowed = {ROOT / "core" / "run" / "config.py"}  # the structured schema registers itself with Hydra
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in _files(pkg) if f not in allowed
           for line, mod in _imports(f) if mod.split(".")[0] in CONFIG_LIBS]
    assert not bad, "\n".join(bad)


GRAPH_PACKAGES = (*LIBRARIES, "recipes")  # and run.py


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> list[ast.AST]:
    """Every import statement, module-level or inside a function, except under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    walk(sub)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append(child)
            walk(child)
    walk(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    files = {_module_name(f): f for pkg in GRAPH_PACKAGES for f in _files(pkg)}
    files["run"] = ROOT / "run.py"
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # import a.b.c of a package: the deepest module named
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``a -> b -> ... -> a``) through each group of modules that import each other (Tarjan's
    strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    circles = []
    for group in groups:  # a shortest way back to the group's first module, by breadth-first search
        start = min(group)
        paths = {w: [start, w] for w in sorted(graph[start] & group)}
        queue = list(paths)
        while start not in paths:
            v = queue.pop(0)
            for w in sorted(graph[v] & group):
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
        circles.append(paths[start])
    return sorted(circles)


def test_no_import_circles():
    """No module imports one that imports it back, directly or through others (function-level imports count)."""
    circles = import_circles(import_graph())
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_guard_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert import_circles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    graph = import_graph()
    assert "core.run.errors" in graph["core.run.io"] and "recipes._launch" in graph["run"]
    assert "pruning.streaming" in graph["pruning.flap"]  # a function-level import


HEAVY = ("torch", "transformers", "pandas", "matplotlib", "wandb", "lm_eval", "datasets", "numpy", "safetensors",
         "peft", "gguf")
# task -> the overrides that make its config valid ({d}: a scratch folder); prune runs once per pruner option
VALID_ARGS = {"prune": ["eval=quick"], "evaluate": [], "analyze": [], "batch_analyze": ["models_dir={d}/models"],
              "convert": ["model={d}/slicegpt/model_0.2.pt"], "table": ["runs=[{d}/runs]"],
              "report": ["runs=[{d}/runs]"], "replace": ["replacement.base=smollm2", "replacement.layers=[1]"],
              "search": ["replacement.base=smollm2"], "finetune": ["recovery=lora"], "export": []}


def test_config_errors_need_no_torch(tmp_path):
    """run.py validates every task (prune with every pruner, and with recovery) before torch, transformers, pandas
    and the other heavy libraries are imported: a bad config is reported in Hydra's time."""
    import json
    import subprocess
    import sys

    from recipes import task_names

    assert set(VALID_ARGS) == set(task_names()), "give every task its valid overrides in VALID_ARGS"
    for sub in ("models", "runs", "slicegpt"):
        (tmp_path / sub).mkdir()
    (tmp_path / "slicegpt" / "model_0.2.pt").touch()  # validation only checks that the files are there
    (tmp_path / "slicegpt" / "config.json").write_text("{}")
    pruners = sorted(p.stem for p in (ROOT / "conf" / "pruner").glob("*.yaml"))
    cases = [[f"task={t}", *(a.format(d=tmp_path) for a in args)] for t, args in sorted(VALID_ARGS.items())]
    cases += [["task=prune", f"pruner={p}", "eval=quick"] for p in pruners] + [["pruner=taylor", "recovery=lora"]]
    code = ("import json, sys; sys.path.insert(0, 'tests'); from pathlib import Path; from conftest import compose; "
            "import run\n"
            "for case in json.loads(sys.argv[1]):\n"
            "    run.check(compose(case, Path('unused')))\n"
            "    heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]\n"
            "    print(json.dumps([case, heavy]))\n"
            "    if heavy: break\n")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cases), json.dumps(HEAVY)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    checked = [json.loads(line) for line in out.stdout.splitlines()]
    assert checked and not checked[-1][1], f"validating {checked[-1][0]} imports {checked[-1][1]}"
    assert [case for case, _ in checked] == cases, out.stdout  # every case validated, in order


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
    from core.run.config import DIRECTIONS

    from core.run.wandb_view import WandbView

    mod = importlib.import_module(f"recipes.{task}")
    assert callable(mod.run) and callable(mod.validate), task
    assert isinstance(mod.METRICS, dict) and set(mod.METRICS.values()) <= set(DIRECTIONS), mod.METRICS
    assert isinstance(getattr(mod, "WANDB_VIEW", WandbView()), WandbView), task
