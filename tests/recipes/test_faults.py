"""Faults: signals, kill -9 in the checkpoint write, occupied dirs, concurrent starts, a full disk. After each,
an earlier run's record and .hydra/ are byte-identical, and no dead run reads as running."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CACHE_DIR, ROOT

TINY = ["model=tiny", "pruner=taylor", "logger=none", "eval=none", "layers=all"]


def _argv(args: list[str]) -> list[str]:
    return [str(ROOT / "run.py"), *args, f"paths.cache_dir={CACHE_DIR}"]


def _patched(patch: str, args: list[str]) -> list[str]:
    """``python -c``: apply ``patch`` (Python source) inside the process, then run run.py as __main__."""
    code = (f"import sys, runpy; sys.path.insert(0, {str(ROOT)!r})\n{patch}\n"
            f"sys.argv = {_argv(args)!r}\nrunpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')\n")
    return [sys.executable, "-c", code]


def _digest(run_dir: Path) -> dict[str, str]:
    files = [run_dir / "metrics.json", run_dir / "run.log", *sorted((run_dir / ".hydra").iterdir())]
    return {str(f.relative_to(run_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A completed run whose files must never change, whatever happens next to it."""
    root = tmp_path_factory.mktemp("outputs")
    run_dir = root / "earlier"
    proc = subprocess.run([sys.executable, *_argv([*TINY, f"hydra.run.dir={run_dir}"])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir, _digest(run_dir)


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and text in path.read_text(errors="ignore"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {text!r} appeared in {path}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_sigterm_during_calibration_is_recorded_as_killed(earlier, tmp_path):
    from core.run.record import run_status

    run_dir = tmp_path / "run"
    # 400 per-sample gradient passes: long enough to be interrupted in the middle of calibration
    proc = subprocess.Popen([sys.executable, *_argv([*TINY, "data.num_samples=400", "data.seq_len=64",
                                                     f"hydra.run.dir={run_dir}"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(run_dir / "run.log", "pruning taylor", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "terminated by signal SIGTERM" in err
    m = _record(run_dir)
    assert m["status"] == "killed" and run_status(m) == "killed" and "pruning" not in m
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model.partial-*"))
    assert _digest(earlier[0]) == earlier[1]


def test_sigint_is_recorded_as_interrupted(tmp_path):
    run_dir = tmp_path / "run"
    # a suite started as a background job inherits SIGINT ignored (and Python then installs no handler):
    # the run under test gets the default disposition, as a run started from a terminal has
    proc = subprocess.Popen([sys.executable, *_argv([*TINY, "data.num_samples=400", "data.seq_len=64",
                                                     f"hydra.run.dir={run_dir}"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(run_dir / "run.log", "pruning taylor", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert _record(run_dir)["status"] == "interrupted"


def test_kill_9_during_checkpoint_write_reads_as_dead(earlier, tmp_path):
    from core.run.record import run_status

    run_dir, flag = tmp_path / "run", tmp_path / "writing"
    patch = ("import time, core.models.checkpoint as c\n_w = c._write_weights\n"
             f"def slow(*a, **k):\n    _w(*a, **k)\n    open({str(flag)!r}, 'w').close()\n    time.sleep(120)\n"
             "c._write_weights = slow")
    proc = subprocess.Popen(_patched(patch, [*TINY, f"hydra.run.dir={run_dir}"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not flag.exists():
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    m = _record(run_dir)
    assert m["status"] == "running" and run_status(m) == "dead"  # nobody could write it: readers know
    assert not (run_dir / "model").exists()  # never a half-written model that looks complete
    assert len(list(run_dir.glob(".model.partial-*"))) == 1
    assert _digest(earlier[0]) == earlier[1]
    # task=table reports the run as dead (no numbers) and removes the orphan nobody will finish
    table = tmp_path / "table"
    proc = subprocess.run([sys.executable, *_argv(["task=table", "logger=none", f"runs=[{run_dir}]",
                                                   f"hydra.run.dir={table}"])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(run_dir.glob(".model.partial-*"))
    t = _record(table)["table"]
    assert len(t["orphans_removed"]) == 1 and "dead" in (table / "results.md").read_text()


def test_second_run_into_an_occupied_dir_touches_nothing(earlier):
    run_dir, before = earlier
    proc = subprocess.run([sys.executable, *_argv([*TINY, "ratio=0.5", f"hydra.run.dir={run_dir}"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert _digest(run_dir) == before


def test_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    procs = [subprocess.Popen([sys.executable, *_argv([*TINY, "save_model=false", f"paths.outputs_root={tmp_path}"])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    records = sorted(tmp_path.glob("*/*/metrics.json"))
    assert len(records) == 3
    assert len({_record(r.parent)["pid"] for r in records}) == 3
    assert all(_record(r.parent)["status"] == "completed" for r in records)


def test_full_disk_during_checkpoint_write(earlier, tmp_path):
    run_dir = tmp_path / "run"
    patch = ("import errno, core.models.checkpoint as c\n"
             "def full(*a, **k):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
             "c.save_file = full")
    proc = subprocess.run(_patched(patch, [*TINY, f"hydra.run.dir={run_dir}"]), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no space left on the device while writing" in proc.stderr
    m = _record(run_dir)
    assert m["status"] == "failed" and m["error"]["type"] == "RunDirError"
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model.partial-*"))
    assert _digest(earlier[0]) == earlier[1]


def test_free_space_is_checked_before_pruning(tmp_path):
    run_dir = tmp_path / "run"
    patch = ("import shutil, collections\nU = collections.namedtuple('U', 'total used free')\n"
             "shutil.disk_usage = lambda p: U(10**9, 10**9 - 2**20, 2**20)")
    proc = subprocess.run(_patched(patch, [*TINY, f"hydra.run.dir={run_dir}"]), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "not enough free space for the checkpoint" in proc.stderr
    m = _record(run_dir)
    assert m["status"] == "failed" and "pruning" not in m  # refused before any work


def test_full_disk_in_the_failure_handler(tmp_path):
    """The failure cannot be recorded: one line says so, and the record reads as dead, never as running."""
    from core.run.record import run_status

    run_dir = tmp_path / "run"
    short = tmp_path / "short.txt"
    short.write_text("Too short for calibration.\n\nReally.")
    patch = ("import errno, core.run.record as r\n"
             "def full(self, *a, **k):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
             "r.RunContext.finish = full")
    proc = subprocess.run(_patched(patch, [*TINY, "data=text_file", f"data.path={short}", f"hydra.run.dir={run_dir}"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "could not be recorded" in proc.stderr and "too short" in proc.stderr
    m = _record(run_dir)
    assert m["status"] == "running" and run_status(m) == "dead"


def test_failing_sweep_job_sets_the_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, *_argv(["-m", *TINY, "save_model=false", "data.num_samples=2",
                                                   "data.seq_len=16", "ratio=0.2,1.5", f"paths.outputs_root={tmp_path}"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 of 2 jobs completed; job 1 failed (invalid configuration: - ratio=1.5 must be in [0, 1))" in proc.stderr
    status = sorted(_record(p.parent)["status"] for p in tmp_path.glob("multirun/*/*/*/metrics.json"))
    assert status == ["completed", "failed"]
