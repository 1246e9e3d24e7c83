"""Every experiment and sweep file composes; sweeps run for real (basic launcher and submitit_local)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import ROOT

FAST = ["model=tiny", "layers=all", "eval=none", "logger=none", "save_model=false", "data.num_samples=2",
        "data.seq_len=16"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_experiment_files_compose(name, tmp_path):
    import run  # noqa: F401  (registers the schema)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", f"paths.output_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    assert cfg.task == "prune" and 0 < cfg.ratio < 1


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "multirun_sweeps").glob("*.yaml")))
def test_sweep_files_compose(name, tmp_path):
    import run  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        from hydra.core.config_search_path import ConfigSearchPath  # noqa: F401
    GlobalHydra.instance().clear()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-cd", str(ROOT / "multirun_sweeps"), "-cn", name,
                           "--cfg", "hydra"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mode: MULTIRUN" in proc.stdout and "params:" in proc.stdout


def _sweep(tmp_path: Path, extra: list[str], fast: list[str] = FAST) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-cd", str(ROOT / "multirun_sweeps"),
                           "-cn", "ratios_x_pruners", *fast, "ratio=0.1,0.5", "pruner=taylor,l2",
                           f"paths.outputs_root={tmp_path}", *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("multirun/*/*/*/metrics.json"))]


def test_sweep_runs_every_job_in_its_own_dir(tmp_path):
    quick_ppl = [a for a in FAST if a != "eval=none"] + ["eval=quick", "eval.generation.enabled=false",
                                                         "eval.ppl.seq_len=32", "eval.ppl.max_tokens=128"]
    runs = _sweep(tmp_path, [], quick_ppl)
    assert len(runs) == 4 and all(r["status"] == "completed" for r in runs)
    assert {(r["method"], r["config"]["ratio"]) for r in runs} == {("taylor", 0.1), ("taylor", 0.5), ("l2", 0.1),
                                                                   ("l2", 0.5)}
    # the sweep ends with one table of every job and the trade-off plot, in the sweep dir
    import pandas as pd

    sweep = next(tmp_path.glob("multirun/*/*"))
    table = pd.read_csv(sweep / "results.csv")
    assert set(table["method"]) >= {"taylor", "l2"} and set(table["status"]) == {"completed"}
    assert len(table[table["method"] != "base"]) == 4
    assert (sweep / "pareto_ppl.png").stat().st_size > 10_000


def test_one_failing_job_does_not_kill_the_sweep(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *FAST, "ratio=0.2,1.5",
                           f"paths.outputs_root={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep ran every job, and says one failed
    status = sorted(json.loads(p.read_text())["status"] for p in tmp_path.glob("multirun/*/*/*/metrics.json"))
    assert status == ["completed", "failed"]


def test_submitit_local_launcher(tmp_path):
    runs = _sweep(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                             "hydra.launcher.cpus_per_task=1"])
    assert len(runs) == 4 and all(r["status"] == "completed" for r in runs)


def test_group_options_only_state_what_differs(tmp_path):
    """l1/l2/random and boolq/text_file take every other option from the schema: same values as the defaults."""
    import conftest

    def node(override, key):
        return dict(getattr(conftest.compose([override], tmp_path), key))

    taylor = node("pruner=taylor", "pruner")
    for p in ("l1", "l2", "random"):
        other = node(f"pruner={p}", "pruner")
        assert (other.pop("name"), other.pop("importance")) == (p, p)
        assert other == {k: v for k, v in taylor.items() if k not in ("name", "importance")}
    for d in ("boolq", "text_file"):
        data = node(f"data={d}", "data")
        assert (data["num_samples"], data["seq_len"], data["seed"]) == (16, 128, 0) and data["source"] == d
