"""An Optuna study through Hydra's sweeper: the direction from optimized_metric, a SQLite study that resumes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

TINY = ["model=tiny", "pruner=taylor", "model.tiny.num_layers=12", "ratio=0.1", "eval=quick", "eval.generation.enabled=false",
        "eval.ppl.seq_len=32", "eval.ppl.max_tokens=128", "logger=none", "data.num_samples=2", "data.seq_len=16"]


def _study(sweep_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "-cd", str(ROOT / "multirun_sweeps"), "-cn",
                           "optuna_budget", *TINY, f"hydra.sweep.dir={sweep_dir}", *extra],
                          capture_output=True, text=True, timeout=600)


def _trials(db) -> list:
    import optuna

    study = optuna.load_study(study_name="prunelab", storage=f"sqlite:///{db}")
    return study, study.trials


def test_study_resumes_from_its_sqlite_storage(tmp_path):
    first = _study(tmp_path / "a", "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr[-3000:]
    db = tmp_path / "a" / "optuna.db"
    study, trials = _trials(db)
    assert len(trials) == 2 and study.direction.name == "MINIMIZE"  # ppl, the prune recipe's first metric
    assert (tmp_path / "a" / "optimization_results.yaml").exists() and (tmp_path / "a" / "results.csv").exists()
    assert (tmp_path / "a" / "convergence.png").stat().st_size > 10_000  # trials and the best so far
    # interrupted after 2: a new sweep dir, the same study, 2 more trials
    second = _study(tmp_path / "b", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{db}")
    assert second.returncode == 0, second.stderr[-3000:]
    _, trials = _trials(db)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert all(t.value > 1 for t in trials)  # perplexities


def test_direction_comes_from_the_recipe():
    from core.run.errors import ConfigError
    from recipes import _launch as run

    assert run.metric_direction("prune", None, None) == "minimize"
    assert run.metric_direction("prune", "avg_acc", None) == "maximize"
    assert run.metric_direction("prune", "avg_acc", "maximize") == "maximize"
    with pytest.raises(ConfigError, match="avg_acc is to maximize, not minimize"):
        run.metric_direction("prune", "avg_acc", "minimize")
    with pytest.raises(ConfigError, match="reports"):
        run.metric_direction("prune", "bleu", None)


def test_a_study_where_every_trial_fails_ends_like_a_sweep(tmp_path):
    """No completed trial: the plugin's study.best_trial would raise; here the summary lists the failures."""
    proc = _study(tmp_path / "s", "hydra.sweeper.n_trials=2", "ratio=1.5")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweep ") and "0 of 2 jobs completed; job 0 failed" in last and "ratio" in last
    _, trials = _trials(tmp_path / "s" / "optuna.db")
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
