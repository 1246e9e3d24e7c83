"""task=table and run statuses: only completed runs give results; failed, killed, dead and running runs are listed
apart with their honest status and no numbers; the orphaned partial checkpoints of ended runs are removed."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import subprocess
import time

import pandas as pd
import pytest

from conftest import run_task

TINY_PRUNE = ["model=tiny", "pruner=taylor", "logger=none", "eval.ppl.max_tokens=512", "eval.generation.enabled=false",
              "layers=all", "ratio=0.5"]
HEADER = ("schema", "task", "started", "heartbeat", "heartbeat_unix", "config")  # what every record starts with


@pytest.fixture(scope="module")
def real_record(tmp_path_factory):
    """The record of one real (tiny) prune run: the shape every hand-written record below copies."""
    _, m = run_task(TINY_PRUNE, tmp_path_factory.mktemp("prune") / "run")
    assert m["status"] == "completed" and m["eval"]["pruned"]["ppl"]["value"] is not None
    return m


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # exited and reaped: no process has this pid now
    return child.pid


def _unfinished(real: dict, **changes) -> dict:
    """A record as a run that stopped early leaves it: the header, its config, and ``changes``."""
    m = {k: copy.deepcopy(real[k]) for k in HEADER}
    m.update(pid=12345, host=socket.gethostname(), run_dir=None)
    m.update(changes)
    return m


def _write(folder, name: str, record: dict, partial: str | None = None):
    run_dir = folder / name
    run_dir.mkdir(parents=True)
    record = {**record, "run_dir": str(run_dir)}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    if partial:  # a checkpoint half written when the process died (core.run.io.atomic_dir)
        (run_dir / partial).mkdir()
        (run_dir / partial / "model-00001.safetensors").write_bytes(b"\0" * 64)
    return run_dir


def _four_runs(folder, real: dict) -> dict:
    ended = time.time() - 3600
    dirs = {"completed": _write(folder, "completed", real)}
    # a failed run whose record holds numbers measured before the failure: they must not show
    dirs["failed"] = _write(folder, "failed", _unfinished(
        real, status="failed", finished="2026-11-23T10:00:00", eval={"base": real["eval"]["base"]},
        params={"base": real["params"]["base"]},
        error={"type": "DataError", "message": "calibration text too short: 12 tokens\nsecond line of detail",
               "traceback": "Traceback ..."}))
    killed_config = copy.deepcopy(real["config"])
    killed_config["pruner"]["name"], killed_config["ratio"] = "l2", 0.25
    dirs["killed"] = _write(folder, "killed", _unfinished(
        real, status="killed", config=killed_config, error={"type": "Terminated",
                                                            "message": "terminated by signal SIGTERM"}),
        partial=".model.partial-4242-k1ll3d")
    # dead: the record still says running, its process is gone; it had pruned (params, eval) but never saved
    dirs["dead"] = _write(folder, "dead", _unfinished(
        real, status="running", pid=_dead_pid(), heartbeat_unix=ended, method="taylor",
        compression=real["compression"], params=real["params"], eval=real["eval"], pruning=real["pruning"]),
        partial=".model.partial-abc")
    return dirs


def test_table_lists_unfinished_runs_apart_and_removes_their_orphans(real_record, tmp_path, caplog):
    runs = tmp_path / "runs"
    dirs = _four_runs(runs, real_record)
    table_dir = tmp_path / "table"
    with caplog.at_level(logging.WARNING):
        result, m = run_task(["task=table", "logger=none", f"runs=[{runs}]"], table_dir)
    assert m["status"] == "completed" and "error" not in m  # listing failed runs is information, not an error

    csv = pd.read_csv(table_dir / "results.csv", dtype=str, keep_default_na=False)
    assert list(csv["status"]) == ["completed", "completed", "dead", "failed", "killed"]  # results first
    status = {os.path.basename(r): s for r, s in zip(csv["run"], csv["status"]) if s != "completed"}
    assert status == {"dead": "dead", "failed": "failed", "killed": "killed"}  # dead, not running
    # the completed run keeps its rows and numbers exactly (params an integer, as without unfinished runs)
    pruned = csv[(csv["status"] == "completed") & (csv["method"] == "taylor")].iloc[0]
    assert pruned["params"] == str(real_record["params"]["pruned"])
    assert float(pruned["ppl"]) == pytest.approx(real_record["eval"]["pruned"]["ppl"]["value"])
    base = csv[csv["method"] == "base"].iloc[0]
    assert base["params"] == str(real_record["params"]["base"])
    # one row per unfinished run: what it was, how it ended, and no number at all
    rest = csv[csv["status"] != "completed"].set_index("status")
    assert len(rest) == 3
    result_cols = [c for c in csv.columns if c not in ("model", "method", "ratio", "unit", "attn_layers",
                                                       "mlp_layers", "task", "status", "error", "note", "run")]
    assert {"params", "params_kept_pct", "ppl"} <= set(result_cols)
    assert (rest[result_cols] == "").all().all(), rest[result_cols]
    assert (rest["model"] == "tiny").all() and (rest["task"] == "prune").all()
    assert rest.loc["dead", "method"] == "taylor" and float(rest.loc["dead", "ratio"]) == 0.5
    assert rest.loc["killed", "method"] == "l2" and float(rest.loc["killed", "ratio"]) == 0.25  # from the config
    assert rest.loc["failed", "error"] == "calibration text too short: 12 tokens"  # the first line only
    assert rest.loc["killed", "error"] == "terminated by signal SIGTERM" and rest.loc["dead", "error"] == ""

    # orphans: removed, logged, recorded in the table record and noted in the row
    assert not (dirs["dead"] / ".model.partial-abc").exists()
    assert not (dirs["killed"] / ".model.partial-4242-k1ll3d").exists()
    assert (dirs["dead"] / "metrics.json").is_file()  # only the partial dir goes
    assert sorted(m["table"]["orphans_removed"]) == sorted([str((dirs["dead"] / ".model.partial-abc").resolve()),
                                                            str((dirs["killed"] / ".model.partial-4242-k1ll3d")
                                                                .resolve())])
    assert "removed unfinished .model.partial-abc" in rest.loc["dead", "note"]
    assert "removed unfinished .model.partial-4242-k1ll3d" in rest.loc["killed", "note"]
    assert rest.loc["failed", "note"] == ""
    assert any(".model.partial-abc" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert m["table"]["incomplete"] == {"dead": 1, "failed": 1, "killed": 1} and m["table"]["result_rows"] == 2

    # Markdown: the results, then the unfinished runs under their own heading; LaTeX: the results only
    md = (table_dir / "results.md").read_text()
    results_md, _, incomplete_md = md.partition("## Runs that did not complete")
    assert incomplete_md, md
    assert "| completed |" in results_md and not any(s in results_md for s in ("dead", "failed", "killed", "| l2 |"))
    assert all(f"| {s} |" in incomplete_md for s in ("dead", "failed", "killed")) and "completed |" not in incomplete_md
    assert "second line of detail" not in md and "| ppl" not in incomplete_md
    tex = (table_dir / "results.tex").read_text()
    assert "\\begin{tabular}" in tex and "dead" not in tex.split("\\end{tabular}")[0]
    assert "% 3 run(s) that did not complete" in tex

    # a second table over the same runs: nothing left to remove, same statuses
    _, m2 = run_task(["task=table", "logger=none", f"runs=[{runs}]"], tmp_path / "table2")
    assert m2["status"] == "completed" and m2["table"]["orphans_removed"] == []


def test_live_running_run_is_listed_as_running_and_keeps_its_partial(real_record, tmp_path):
    runs = tmp_path / "runs"
    _write(runs, "completed", real_record)
    live = _write(runs, "live", _unfinished(real_record, status="running", pid=os.getpid(),
                                            heartbeat_unix=time.time()), partial=".model.partial-abc")
    _, m = run_task(["task=table", "logger=none", f"runs=[{runs}]"], tmp_path / "table")
    assert m["status"] == "completed" and m["table"]["orphans_removed"] == []
    assert (live / ".model.partial-abc" / "model-00001.safetensors").is_file()  # its process may still finish it
    csv = pd.read_csv(tmp_path / "table" / "results.csv", dtype=str, keep_default_na=False)
    row = csv[csv["status"] == "running"]
    assert len(row) == 1 and row.iloc[0]["params"] == "" and row.iloc[0]["ppl"] == ""
    assert list(csv["status"])[-1] == "running"
    md = (tmp_path / "table" / "results.md").read_text()
    assert "| running |" in md.partition("## Runs that did not complete")[2]


def test_only_unfinished_runs_still_make_a_table(real_record, tmp_path):
    runs = tmp_path / "runs"
    _write(runs, "failed", _unfinished(real_record, status="failed", error={"type": "X", "message": "boom"}))
    _, m = run_task(["task=table", "logger=none", f"runs=[{runs}]"], tmp_path / "table")
    assert m["status"] == "completed" and m["table"]["result_rows"] == 0
    md = (tmp_path / "table" / "results.md").read_text()
    assert md.startswith("## Runs that did not complete") and "| boom |" in md


def test_remove_orphans_only_for_ended_runs(tmp_path):
    from analysis.results_table import remove_orphans

    def run_dir(name, status, **extra):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"status": status, "host": socket.gethostname(), **extra}))
        (d / ".model.partial-x").mkdir()
        (d / ".notes.txt").write_text("not a partial dir")
        return d

    live = run_dir("live", "running", pid=os.getpid())
    done = run_dir("done", "completed")
    failed = run_dir("failed", "failed")
    assert remove_orphans(live) == [] and (live / ".model.partial-x").is_dir()
    assert remove_orphans(done) == [] and (done / ".model.partial-x").is_dir()
    assert remove_orphans(failed) == [str(failed / ".model.partial-x")]
    assert not (failed / ".model.partial-x").exists() and (failed / ".notes.txt").is_file()
    assert remove_orphans(done, status="interrupted") == [str(done / ".model.partial-x")]  # a status given wins
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / ".model.partial-y").mkdir()
    assert remove_orphans(unreadable) == [] and (unreadable / ".model.partial-y").is_dir()


def test_run_status_edge_cases():
    from core.run.record import HEARTBEAT_S, run_status

    now = time.time()
    here = socket.gethostname()
    assert run_status({"status": "running", "pid": os.getpid(), "host": here}) == "running"
    assert run_status({"status": "running", "pid": _dead_pid(), "host": here}) == "dead"
    other = {"status": "running", "pid": 1, "host": here + "-elsewhere"}  # another host: only the heartbeat tells
    assert run_status({**other, "heartbeat_unix": now - 10 * HEARTBEAT_S}, now=now) == "dead"
    assert run_status({**other, "heartbeat_unix": now - 1}, now=now) == "running"
    for final in ("completed", "failed", "killed", "interrupted"):
        assert run_status({"status": final, "pid": _dead_pid(), "host": here}) == final
    assert run_status({}) == "unknown"


def test_orphans_of_another_hosts_run_wait_for_an_old_heartbeat(tmp_path):
    """A run on another host is judged dead by its heartbeat alone: its partial dir is only removed once that
    heartbeat is an hour old (a stalled but live run must not lose its save)."""
    import json
    import time

    from analysis.results_table import remove_orphans
    from core.run.record import run_status

    for age, removed in ((300, False), (7200, True)):
        run_dir = tmp_path / f"age{age}"
        (run_dir / ".model.partial-1-x").mkdir(parents=True)
        m = {"status": "running", "pid": 1, "host": "another-host", "heartbeat_unix": time.time() - age}
        (run_dir / "metrics.json").write_text(json.dumps(m))
        assert run_status(m) == "dead"
        assert bool(remove_orphans(run_dir)) is removed
        assert (run_dir / ".model.partial-1-x").exists() is not removed
