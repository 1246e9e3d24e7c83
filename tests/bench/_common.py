"""Shared by the benchmarks: one child process measured from outside (wall time, peak RSS through ``os.wait4``),
and the zero-shot average as task=evaluate computes it."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


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
