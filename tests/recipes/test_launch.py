"""run.py's compose_and_validate: a command line composed and checked as run.py would, without running it."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.run.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


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


def test_startup_seconds_count_from_the_process_start_to_the_tick():
    """The record's startup_s is measured from the process's own start (to a clock tick), not from psutil's
    create_time, whose boot time is whole seconds and can put it up to a second off."""
    import subprocess
    import sys

    code = ("import time; t = time.perf_counter(); time.sleep(0.3); import sys; sys.path.insert(0, %r); "
            "from recipes._launch import _startup_seconds; s = _startup_seconds(); "
            "print(s, time.perf_counter() - t)" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    startup, since_first_line = float(out[0]), float(out[1])
    # at least the time the script itself has run (one 10 ms tick of slack), at most that plus the interpreter's
    # start; psutil's create_time was off by the boot time's fraction of a second (0.88 s on this machine)
    assert since_first_line - 0.02 <= startup <= since_first_line + 0.5


def test_imports_without_gc_pauses_the_collector_and_restores_what_it_found():
    import gc

    from recipes._launch import imports_without_gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with imports_without_gc():
            assert not gc.isenabled()
            raise RuntimeError("an import failed")
    assert gc.isenabled()  # back on after a failed import too
    gc.disable()  # python run.py: paused from the start until the recipe runs
    try:
        with imports_without_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # left as found
    finally:
        gc.enable()
