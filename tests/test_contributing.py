"""The README's Contributing steps, followed literally in a copy of the repository, add a working pruner.

The test reads the steps from README.md itself (so a step that stops working, or a README that stops saying
it, fails here): it runs the step-1 shell block, makes the step-2 edit, and runs the step-3 commands exactly
as written, in a temporary copy of the checkout whose ``.venv`` and ``.cache`` link to this one's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def contributing_section() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Contributing\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "README.md has no '## Contributing' section"
    return m.group(1)


def steps(section: str) -> dict[int, str]:
    """``{n: text}`` of the numbered steps (a step runs until the next ``n.`` at the start of a line)."""
    parts = re.split(r"^(\d+)\. ", section, flags=re.M)
    return {int(n): body for n, body in zip(parts[1::2], parts[2::2])}


def copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for link in (".venv", ".cache"):  # the installed environment and the converted model / data, shared
        if (ROOT / link).exists():
            (dest / link).symlink_to(ROOT / link)


def add_to_experiment_list(path: Path, entry: str) -> None:
    """Step 2: append ``entry`` to the comma-separated ``experiment:`` value of a sweep file."""
    lines = path.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("experiment:"))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start
    while end + 1 < len(lines) and lines[end + 1].strip() and len(lines[end + 1]) - len(lines[end + 1].lstrip()) > indent:
        end += 1
    lines[end] = lines[end].rstrip().rstrip(",") + "," + entry
    path.write_text("\n".join(lines))


@pytest.mark.integration
def test_the_readme_contributing_steps_add_a_working_pruner(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_checkout(repo)
    env = {**os.environ, "PRUNELAB_ROOT": str(repo), "PRUNELAB_CACHE": str(ROOT / ".cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}

    def sh(cmd: str) -> subprocess.CompletedProcess:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    step = steps(contributing_section())
    # 1. the shell block
    block = re.search(r"```bash\n(.*?)```", step[1], re.S)
    assert block, "step 1 has no ```bash block"
    sh(block.group(1))
    # 2. "Add `<entry>` to the `experiment` list in `<file>`."
    m = re.search(r"Add `([^`]+)` to the `experiment` list in `([^`]+)`", step[2])
    assert m, f"step 2 no longer reads as an edit this test knows how to make: {step[2]!r}"
    add_to_experiment_list(repo / m.group(2), m.group(1))
    # 3. the commands, as written
    commands = [c for c in re.findall(r"`([^`]+)`", step[3]) if "pytest" in c or "run.py" in c]
    assert any("pytest" in c for c in commands) and any("run.py" in c for c in commands), step[3]
    for cmd in commands:
        sh(cmd)

    # What the steps promised: a pruner option that composes, runs, records and is swept.
    assert (repo / "pruning/my_method.py").is_file() and (repo / "conf/pruner/my_method.yaml").is_file()
    runs = sorted((repo / "outputs").rglob("metrics.json"))
    assert runs, "python run.py pruner=my_method wrote no run record"
    record = runs[-1].read_text()
    assert '"status": "completed"' in record and '"method": "my_method"' in record
    sweep = (repo / "multirun_sweeps/ratio_x_method.yaml").read_text()
    assert "baselines/my_method" in sweep
