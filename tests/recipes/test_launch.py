"""run.py's compose_and_validate: a command line composed and checked as run.py would, without running it."""

from __future__ import annotations

import pytest

from core.run.errors import ConfigError


def test_a_command_line_is_composed_and_checked_without_running(tmp_path):
    import run

    (cfg,) = run.compose_and_validate(["pruner=l1", "ratio=0.3", f"paths.outputs_root={tmp_path}"])
    assert cfg.pruner.name == "l1" and cfg.ratio == 0.3 and cfg.task == "prune"
    with pytest.raises(ConfigError, match="task='nope' is not one of"):
        run.compose_and_validate(["task=nope"])
    with pytest.raises(ConfigError, match="not a flag of a run"):
        run.compose_and_validate(["--cfg", "job"])


def test_a_sweep_gives_one_checked_config_per_job_and_claims_no_dir(tmp_path, monkeypatch):
    import run

    monkeypatch.setenv("PRUNELAB_ROOT", str(tmp_path))  # paths.root_dir: the outputs root is in tmp_path from the start
    jobs = run.compose_and_validate(["-m", "ratio=0.1,0.2,0.3", "pruner=taylor,l2"])
    assert sorted((c.pruner.name, c.ratio) for c in jobs) == sorted(
        (p, r) for p in ("taylor", "l2") for r in (0.1, 0.2, 0.3))
    files = run.compose_and_validate(["-cd", "multirun_sweeps", "-cn", "baselines"])
    assert len(files) == 7 and len({c.run_name for c in files}) == 7  # one job per preset of the sweep file
    assert not any(tmp_path.iterdir())  # composing named the run and sweep dirs, it created none
