"""tests/gpu/run.sh is checked where there is no GPU (CI): its syntax, and its dry run (PRUNELAB_GPU_DRYRUN=1),
which composes, validates and plans every step it would run on a GPU (nothing is loaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "tests" / "gpu" / "run.sh"


def test_the_gpu_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_gpu_script_dry_runs_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, "PRUNELAB_GPU_DRYRUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PRUNELAB_GPU_WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=400,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    labels = {r["label"] for r in lines}
    for method in sorted(p.stem for p in (SCRIPT.parents[2] / "conf" / "pruner").glob("*.yaml")):  # every pruner
        assert f"smol_{method}" in labels, method
    for task in ("replace", "search", "finetune", "export"):
        assert {f"smol_{task}", f"l3_{task}"} <= labels, task
    assert all(r["ok"] and r["status"] == "dry_run" for r in lines), [r for r in lines if not r["ok"]]
    on_cuda = [r for r in lines if "model.device=cuda" in r["args"]]
    assert len(on_cuda) >= 20 and all(r["predicted_device_bytes"] > 0 for r in on_cuda)  # a device plan each
    assert '"method": "obs"' in proc.stdout and '"method": "taylor"' in proc.stdout  # agreement.py's pruners built
