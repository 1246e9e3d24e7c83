"""Shared by the benchmarks: where their lines go (``record``: stdout as always, plus the committed results file
``tests/bench/results/<bench>.jsonl`` with date, commit and machine), one child process measured from outside
(wall time, peak RSS through ``os.wait4``), and the zero-shot average as task=evaluate computes it.

``PRUNELAB_BENCH_RECORD=0`` prints the line without appending it (a trial run that should leave no trace)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
# Written by the benchmarks and the renderer themselves: a change there does not make a measured tree dirty.
_NOT_CODE = ("tests/bench/results", "docs/benchmarks.md")


def bench_name(script: str) -> str:
    """``tests/bench/prune_bench.py`` -> ``prune``: the results file's name."""
    return Path(script).stem.removesuffix("_bench")


def git_commit(root: Path = ROOT) -> Optional[str]:
    """The checkout's short sha, ``+dirty`` when a tracked or untracked file differs from it (outside the results
    and the rendered page); None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        sha = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in _NOT_CODE)).strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def machine(threads: Optional[int] = None) -> dict[str, Any]:
    """CPU model, logical cores, the torch threads the measurement used (``threads``, else torch's own setting
    when torch is loaded in this process) and the GPU's name when there is one."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if cpu is None:
        import platform

        cpu = platform.processor() or platform.machine() or None
    torch = sys.modules.get("torch")
    if threads is None and torch is not None:
        threads = torch.get_num_threads()
    gpu = None
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    else:  # without importing torch: the NVIDIA driver's own description
        for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
            for line in Path(info).read_text().splitlines():
                if line.startswith("Model:"):
                    gpu = line.split(":", 1)[1].strip()
                    break
            if gpu:
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "gpu": gpu}


def record(result: dict[str, Any], script: str, threads: Optional[int] = None) -> dict[str, Any]:
    """Print ``result`` as the benchmark always has (one JSON line on stdout), then append it to
    ``results/<bench>.jsonl`` with ``bench`` (when the line has none), ``date`` (ISO, UTC), ``commit`` and
    ``machine``. ``threads``: the torch threads measured with, when not the line's own ``threads``."""
    print(json.dumps(result), flush=True)
    if threads is None and isinstance(result.get("threads"), int):
        threads = result["threads"]
    line = {"bench": bench_name(script), **result,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine(threads)}
    if os.environ.get("PRUNELAB_BENCH_RECORD", "1") != "0":
        RESULTS.mkdir(exist_ok=True)
        with open(RESULTS / f"{bench_name(script)}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")  # one write per line: lines of two benchmarks never interleave
    return line


@dataclass
class Child:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_gib: float


def run_child(cmd: list[str], cwd: Path, env: Optional[dict] = None) -> Child:
    """Run ``cmd`` to its end; stderr goes to a file (a full stderr pipe would block the child)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        err_file.seek(0)
        err = err_file.read()
    return Child(os.waitstatus_to_exitcode(status), out, err, time.perf_counter() - t0,
                 usage.ru_maxrss / 1024**2)  # KiB -> GiB


def zeroshot_average(model: Any, tok: Any, limit: int, cache: str, root: Path) -> Optional[dict[str, Any]]:
    """The 7-task zero-shot average (``conf/eval/zeroshot.yaml``'s tasks, first ``limit`` examples each), as
    task=evaluate runs them; None when ``limit`` is 0."""
    if not limit:
        return None
    from omegaconf import OmegaConf

    from analysis.evaluate import evaluate_model
    from analysis.lm_eval_tasks import HEADLINE_METRIC

    cfg = OmegaConf.to_container(OmegaConf.load(root / "conf/eval/zeroshot.yaml"), resolve=True)
    cfg.update({"limit": limit, "ppl": {**cfg["ppl"], "enabled": False}})
    t0 = time.perf_counter()
    res = evaluate_model(model, tok, cfg, cache_dir=cache, progress=False)
    return {"average": res.get("task_average"), "limit": limit, "seconds": round(time.perf_counter() - t0, 1),
            "tasks": {k: v.get(HEADLINE_METRIC.get(k, "acc")) for k, v in res.get("tasks", {}).items()}}
