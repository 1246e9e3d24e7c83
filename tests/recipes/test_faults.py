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


def _slow_analysis(flag: Path) -> str:
    """A patch: the analysis announces itself in ``flag``, then takes a minute (a large model's analysis)."""
    return ("import time, analysis.report as r\n_w = r.write_analysis\n"
            f"def slow(*a, **k):\n    open({str(flag)!r}, 'w').close()\n    time.sleep(60)\n    return _w(*a, **k)\n"
            "r.write_analysis = slow")


# SIGTERM while a task works, one case per entry point: (args, a patch that makes it slow or None, what marks
# that the work has begun: a line of run.log or a flag file the patch writes)
SIGTERM_CASES = {
    # 400 per-sample gradient passes: long enough to be interrupted in the middle of calibration
    "prune": ([*TINY, "data.num_samples=400", "data.seq_len=64"], None, "pruning taylor"),
    "analyze": (["task=analyze", "model=tiny", "logger=none"], _slow_analysis, "flag"),
}


@pytest.mark.parametrize("case", list(SIGTERM_CASES))
def test_sigterm_is_recorded_as_killed(earlier, tmp_path, case):
    from core.run.record import run_status

    args, patch, mark = SIGTERM_CASES[case]
    run_dir, flag = tmp_path / "run", tmp_path / "flag"
    argv = [*args, f"hydra.run.dir={run_dir}"]
    cmd = _patched(patch(flag), argv) if patch else [sys.executable, *_argv(argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if mark == "flag":
        t0 = time.time()
        while not flag.exists():
            assert proc.poll() is None and time.time() - t0 < 120
            time.sleep(0.05)
    else:
        _wait_for(run_dir / "run.log", mark, proc)
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


def test_two_runs_started_together_on_one_run_dir(tmp_path):
    """Both pass the checks at the same moment (each waits 3 s after them): the exclusive claim of .hydra/ lets
    one run; the other stops in one line before writing anything, so run.log and .hydra/ are the winner's."""
    run_dir = tmp_path / "run"
    patch = ("import time, recipes._callbacks as c\n_u = c._usable\n"
             "def slow(*a, **k):\n    _u(*a, **k)\n    time.sleep(3)\nc._usable = slow")
    procs = [subprocess.Popen(_patched(patch, [*TINY, "save_model=false", f"seed={s}", f"hydra.run.dir={run_dir}"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], [err[-1500:] for _, err in results]
    loser = next(err for code, err in results if code == 1)
    assert loser.strip().splitlines() == [f"error: {run_dir} already holds a run; runs never overwrite each other "
                                          "(choose another hydra.run.dir, or leave it out: the default is a new dir)"]
    m = _record(run_dir)
    assert m["status"] == "completed"
    log_text = (run_dir / "run.log").read_text()
    assert "ERROR" not in log_text and "already holds a run" not in log_text
    assert f"seed={m['config']['seed']}" in (run_dir / ".hydra" / "overrides.yaml").read_text()


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
