"""The docs cannot go stale: the site builds with --strict (no broken link or anchor), every `python run.py ...`
command in a code block of README.md or docs/ composes and validates as run.py would run it (no weights loaded),
and the README stays short."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
# a command line, optionally after environment assignments (LLAMA3_8B_PATH=... python run.py ...)
COMMAND = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*python run\.py(?:\s|$)")
PLACEHOLDER = re.compile(r"<([A-Za-z0-9_.-]+)>")  # <checkpoint>, <run_dir>: a path the reader fills in
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Overrides that name an input which must exist for validation to pass (a folder of models, a run dir, a text).
# Relative paths and placeholders are created in a sandbox; absolute paths elsewhere are left as they are.
INPUT_KEYS = {"model", "models_dir", "runs", "base", "replacement.base", "replacement.donor", "data.path",
              "eval.ppl.path", "recovery.data.path", "recovery.resume", "search.resume"}
FILE_SUFFIXES = {".pt", ".bin", ".gguf", ".safetensors", ".txt", ".jsonl", ".json"}


def documented_commands() -> list[tuple[Path, int, str]]:
    """(file, line, command) of every `python run.py ...` line inside a fenced code block; a line ending in `\\`
    continues on the next."""
    found = []
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_code, i = False, 0
        while i < len(lines):
            if FENCE.match(lines[i]):
                in_code = not in_code
                i += 1
                continue
            if in_code:
                start, text = i, lines[i].strip()
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1].rstrip() + " " + lines[i].strip()
                if COMMAND.match(text):
                    found.append((path, start + 1, text))
            i += 1
    return found


COMMANDS = documented_commands()


def _inputs(key: str, value: str) -> list[str]:
    if key == "runs":
        return [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return [value]


def _make_inputs(args: list[str], sandbox: Path) -> None:
    """Create the inputs a command names (relative to the sandbox, or a placeholder in it), as a user would have
    them: folders, or empty files for names with a file suffix."""
    options = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key not in INPUT_KEYS:
            continue
        for item in _inputs(key, value):
            if item in options or ("/" not in item and item in ("latest", "true", "false", "null")):
                continue
            if "/" not in item and not Path(item).suffix:
                continue  # a name, not a path
            path = Path(item)
            path = path if path.is_absolute() else sandbox / path
            if sandbox not in path.parents:
                continue  # /data/...: the reader's own file, outside what the test can provide
            if path.suffix in FILE_SUFFIXES:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("path,line,command", COMMANDS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in COMMANDS])
def test_documented_command_composes_and_validates(path, line, command, tmp_path, monkeypatch):
    """Composed with Hydra's compose API and checked by run.py's own checks (schema, the task's validate, the
    method's options bound to its class, the optimised metric), every job of a sweep included."""
    import run

    sandbox = tmp_path / "cwd"
    (sandbox / "outputs").mkdir(parents=True)
    for name in ("conf", "multirun_sweeps"):  # `-cd multirun_sweeps` is relative to the working directory
        (sandbox / name).symlink_to(ROOT / name)
    tokens = shlex.split(command, comments=True)
    while tokens and ENV.match(tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    assert tokens[:2] == ["python", "run.py"], command
    args = [PLACEHOLDER.sub(lambda m: str(sandbox / m.group(1)), a) for a in tokens[2:]]
    assert "..." not in args, f"{path.name}:{line}: a fragment, not a command: write it out in full"
    _make_inputs(args, sandbox)
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("PRUNELAB_ROOT", str(sandbox))  # paths.outputs_root and friends inside the sandbox
    try:
        configs = run.compose_and_validate(args)
    except Exception as e:  # noqa: BLE001 - name the documented line, whatever failed
        pytest.fail(f"{path.relative_to(ROOT)}:{line}: `{command}` does not compose: {type(e).__name__}: {e}")
    assert configs, command


def test_commands_are_found():
    """The extraction sees one example per workflow in the README: prune, baselines, replace + search, recover,
    export, sweep + report, analyze."""
    readme = [c for p, _, c in COMMANDS if p == README]
    tasks = {m.group(1) for c in readme for m in re.finditer(r"\btask=(\w+)", c)}
    assert {"replace", "search", "finetune", "export", "report", "analyze"} <= tasks, tasks
    assert any("pruner=" in c for c in readme) and any(" -m " in c for c in readme)
    assert any("-cn baselines" in c for c in readme), readme


def test_site_builds_strict(tmp_path):
    """mkdocs.yml turns broken links and anchors into warnings, and --strict into errors."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    import yaml

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for n in node:
                yield from pages(n)
        elif isinstance(node, dict):
            for n in node.values():
                yield from pages(n)

    nav = set(pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    files = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert files == nav, (sorted(files - nav), sorted(nav - files))


def test_readme_is_short_and_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    relative = [link for link in links if "://" not in link]
    assert relative, "the README links into the docs"
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, missing


def test_named_source_files_exist():
    """Every module or option file the docs name in code (`pruning/obs/fit.py`, `conf/pruner/obs.yaml`) exists: a
    move or rename that forgets the docs fails here. Names in the contributing recipe (`my_method`) are examples."""
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    missing = []
    for path in DOC_FILES:
        for span in re.findall(r"`([^`\n]+)`", path.read_text(encoding="utf-8")):
            name = re.split(r"[:\s]", span, maxsplit=1)[0]
            if (name.split("/")[0] in top and name.endswith((".py", ".yaml")) and "my_method" not in name
                    and not re.search(r"[<>*{}$]|/X\.", name) and not (ROOT / name).exists()):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(missing)


def test_generated_blocks_have_their_markers():
    """The renderers fill these blocks (README's results table, the ratio table); each pair appears once, in order."""
    for path, name in ((README, "results"), (ROOT / "docs" / "options.md", "ratio-table")):
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        assert lines.count(begin) == 1 and lines.count(end) == 1, (path, name)
        assert lines.index(begin) < lines.index(end), (path, name)
