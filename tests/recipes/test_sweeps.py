"""Every experiment and sweep file composes; sweeps run for real (basic launcher and submitit_local)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import ROOT

FAST = ["model=tiny", "pruner=taylor", "layers=all", "eval=none", "logger=none", "save_model=false", "data.num_samples=2",
        "data.seq_len=16"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_experiment_files_compose(name, tmp_path):
    import run  # noqa: F401  (registers the schema)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", f"paths.output_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    from recipes import task_names

    assert cfg.task in task_names()
    if cfg.task == "prune":
        assert 0 < cfg.ratio < 1


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


GRID_SWEEPS = sorted(p.stem for p in (ROOT / "multirun_sweeps").glob("*.yaml") if "optuna" not in p.stem)
SWEEP_NEEDS = {"replacement_k": ["replacement.base=tiny"]}  # the model that receives the donor's layers


@pytest.mark.parametrize("name", GRID_SWEEPS)
def test_every_sweep_point_composes_and_validates(name, tmp_path):
    """Each job a grid sweep would launch composes with its overrides and passes run.py's checks: a typo in a
    sweep file fails here, not an hour into a cluster sweep."""
    import run
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    extra = [*SWEEP_NEEDS.get(name, []), f"hydra.searchpath=[file://{ROOT / 'conf'}]",
             f"paths.outputs_root={tmp_path}"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "multirun_sweeps"), version_base="1.3"):
            cfg = compose(name, overrides=extra, return_hydra_config=True)
            params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
            jobs = [j for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
                    for j in batch]
            assert len(jobs) >= 3
            for job in jobs:
                job_cfg = compose(name, overrides=[*extra, *job])
                run.check(job_cfg)
                for override in job:  # the swept value is the one the job runs with (presets do not undo it)
                    key, value = override.split("=", 1)
                    if key != "experiment":
                        assert str(OmegaConf.select(job_cfg, key)).replace(" ", "") == value, (job, key)
    finally:
        GlobalHydra.instance().clear()


def test_ratio_x_method_covers_every_pruner(tmp_path):
    params = OmegaConf.load(ROOT / "multirun_sweeps" / "ratio_x_method.yaml").hydra.sweeper.params
    presets = [p.strip() for p in params.experiment.split(",")]
    pruners = {OmegaConf.load(ROOT / "conf" / "experiment" / f"{p}.yaml").defaults[0]["override /pruner"]
               for p in presets}
    assert pruners == {p.stem for p in (ROOT / "conf" / "pruner").glob("*.yaml")}


def _sweep(tmp_path: Path, extra: list[str], fast: list[str] = FAST) -> list[dict]:
    fast = [a for a in fast if not a.startswith("pruner=")]  # this sweep varies the pruner
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *fast, "ratio=0.1,0.5", "pruner=taylor,l2",
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


QUICK = [a for a in FAST if a != "eval=none"] + ["eval=quick", "eval.generation.enabled=false", "eval.ppl.seq_len=32",
                                                "eval.ppl.max_tokens=128"]
LAUNCHERS = {"joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
             "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                                "hydra.launcher.cpus_per_task=1"]}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_parallel_launchers_record_every_job_and_the_failure(launcher, tmp_path):
    """Two jobs through a real launcher, one with a layer range beyond the model: both recorded, the failing one
    with its one-line error, the table and the plot written at the end, exit code 1."""
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *QUICK, "layers.attention.start=0,40",
                           f"paths.outputs_root={tmp_path}", *LAUNCHERS[launcher]],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    sweep = next(tmp_path.glob("multirun/*/*"))
    runs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert {k: r["status"] for k, r in runs.items()} == {"0": "completed", "1": "failed"}, runs["0"].get("error")
    assert "beyond the model's depth" in runs["1"]["error"]["message"]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweep ") and "1 of 2 jobs completed; job 1 failed (layers.attention" in last
    assert (sweep / "results.csv").exists() and (sweep / "pareto_ppl.png").stat().st_size > 10_000
    page = (sweep / "report.html").read_text()
    assert {'data-run="0"', 'data-run="1"'} <= set(re.findall(r'data-run="[^"]*"', page))  # base row: 0 too
    assert "data:image/png;base64," in page and f"report {sweep}" in last
    # each job's torch threads fit its share of the cores: two jobs on two cores never run 2 x 2 threads
    cores = len(os.sched_getaffinity(0))
    assert all(r["runtime"]["threads"] == (max(1, cores // 2) if launcher == "joblib" else 1) for r in runs.values())
    assert all(r["runtime"]["launcher"] for r in runs.values())


def test_job_threads_budget():
    from recipes import _launch as run

    assert run.job_threads(None, {"_target_": "hydra_plugins.hydra_joblib_launcher.JoblibLauncher", "n_jobs": 2},
                           cpus=2) == 1
    assert run.job_threads(None, {"_target_": "x.JoblibLauncher", "n_jobs": -1}, cpus=16) == 1
    assert run.job_threads(None, {"_target_": "x.JoblibLauncher", "n_jobs": 4}, cpus=16) == 4
    assert run.job_threads(None, {"_target_": "x.JoblibLauncher", "n_jobs": -2}, cpus=16) == 1  # 15 jobs
    assert run.job_threads(3, {"_target_": "x.JoblibLauncher", "n_jobs": 2}, cpus=2) == 3  # runtime.threads wins
    assert run.job_threads(None, {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "cpus_per_task": 8}, cpus=64) == 8
    assert run.job_threads(None, {"_target_": "x.BasicLauncher"}, cpus=2) is None


def test_a_reused_worker_keeps_no_model_of_the_previous_job(tmp_path):
    """joblib and the basic launcher run several jobs in one process: after a job, none of its modules live on."""
    import gc

    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    import run
    from conftest import CACHE_DIR

    try:
        for i, ratio in enumerate((0.2, 0.4)):
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("config", return_hydra_config=True,
                              overrides=[*QUICK, f"ratio={ratio}", f"paths.output_dir={tmp_path / str(i)}",
                                         f"paths.cache_dir={CACHE_DIR}"])
            GlobalHydra.instance().clear()
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.job.num = i
            HydraConfig.instance().set_config(cfg)
            job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # what a launcher hands a job
            assert run.run(job_cfg) is not None
            gc.collect()
            alive = [type(o).__name__ for o in gc.get_objects()  # (transformers keeps parameter-free activations)
                     if isinstance(o, torch.nn.Module) and next(o.parameters(recurse=True), None) is not None]
            assert alive == [], alive
    finally:  # later tests in this process must not see a multirun
        HydraConfig.instance().cfg = None


def test_slurm_preset_is_one_override():
    """hydra/launcher=slurm_gpu composes into submitit's SLURM launcher with a GPU per job."""
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-cd", str(ROOT / "multirun_sweeps"), "-cn",
                           "layer_ranges", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                           "--package", "hydra.launcher"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher = OmegaConf.create(proc.stdout)  # printed at its package, hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 1 and launcher.cpus_per_task >= 1 and launcher.array_parallelism >= 1


@pytest.mark.parametrize("override, package", [("hydra/sweeper=nevergrad", "hydra-nevergrad-sweeper"),
                                               ("hydra/launcher=ray", "hydra-ray-launcher")])
def test_missing_plugin_names_its_pip_package(override, package, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *FAST, override,
                           f"paths.outputs_root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {override} needs the Hydra plugin {package}, which is not "
                                                f"installed (pip install {package})"]
    assert not any(tmp_path.iterdir())


def test_unknown_override_fails_before_any_job(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *FAST, "ratio=0.1,0.2", "pruner.no_such=1",
                           f"paths.outputs_root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no_such" in proc.stderr
    assert not list(tmp_path.glob("multirun/*/*/*/metrics.json"))


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
