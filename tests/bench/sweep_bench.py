"""Launcher overhead of a sweep: launch to model loaded, per job, with the basic, joblib and submitit_local
launchers. One JSON line.

    .venv/bin/python tests/bench/sweep_bench.py [--jobs 3]

Each launcher runs the same sweep of ``--jobs`` SmolLM2 jobs (pruner=l2 at different ratios, 2 x 16 calibration
tokens, eval=none, no checkpoint: the jobs are mostly launch and model load). A job's launch is when its launcher
could start it: the sweep command's start for the first job and for submitit_local (whose jobs are all submitted
at once), the previous job's end for the sequential basic and joblib (n_jobs=1) launchers. Its model is loaded at
``job_start_unix + validate_s + load_s`` of its record. ``first_s`` is the first job's launch-to-loaded (a cold
process: interpreter, imports, Hydra), ``next_s`` the median of the others (what each further job of a sweep
costs before work starts), ``sweep_s`` the whole command. The reference, measured in the same run, is the
basic launcher; ``load_s`` (reading the model itself) is the floor no launcher can go under.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import record  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]
JOB = ["model=smollm2", "pruner=l2", "layers=all", "eval=none", "logger=none", "save_model=false",
       "data.num_samples=2", "data.seq_len=16"]
LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
                       "hydra.launcher.cpus_per_task=1"],
}


def sweep(name: str, ratios: str, out: Path, env: dict) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *JOB, f"ratio={ratios}",
                           f"paths.outputs_root={out}", *LAUNCHERS[name]], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} sweep failed: {proc.stderr.strip().splitlines()[-1:]}")
    records = sorted((json.loads(p.read_text()) for p in out.glob("multirun/*/*/*/metrics.json")),
                     key=lambda m: m["timings"]["job_start_unix"])
    loaded, previous_end = [], t0
    for m in records:
        t = m["timings"]
        launch = t0 if name == "submitit_local" else previous_end
        loaded.append(t["job_start_unix"] + t["validate_s"] + t["load_s"] - launch)
        previous_end = t["job_end_unix"]
    return {"first_s": round(loaded[0], 2), "next_s": round(statistics.median(loaded[1:]), 2),
            "sweep_s": round(wall, 2), "load_s": round(statistics.median(m["timings"]["load_s"] for m in records), 2),
            "threads": sorted({m["runtime"]["threads"] for m in records})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3)
    args = ap.parse_args()
    ratios = ",".join(f"{0.05 * (i + 1):.2f}" for i in range(args.jobs))
    env = dict(os.environ)  # each launcher picks its own thread count (run.py job_threads)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in LAUNCHERS:
            result[name] = sweep(name, ratios, Path(tmp) / name, env)
    basic = result["basic"]
    record({
        "bench": "sweep_launchers", "model": "smollm2", "jobs": args.jobs, **{k: v for k, v in result.items()},
        "next_vs_basic": {k: round(v["next_s"] / basic["next_s"], 2) for k, v in result.items()},
        "sweep_vs_basic": {k: round(v["sweep_s"] / basic["sweep_s"], 2) for k, v in result.items()},
    }, __file__)


if __name__ == "__main__":
    main()
