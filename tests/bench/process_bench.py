"""Whole-process benchmark of the prune command: one JSON line.

    .venv/bin/python tests/bench/process_bench.py [--repeats 3] [--threads 1]

Runs the foundation issue's acceptance command (SmolLM2, taylor param_first, ratio 0.25, layers [3, 27),
10 x 64 calibration tokens; eval=none logger=none) as a child process: start, imports, load, prune, save,
analysis, exit. Reports the wall time and peak RSS of that child (os.wait4), the split recorded in its
metrics.json, and the floor it is compared with: one plain forward+backward over the same calibration tokens
(all parameters requiring grad, as a training step would), timed in another child after a warm-up.
Target (layout issue): wall <= floor + 5 s, peak RSS <= 1.6 GiB. Medians over --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _common import run_child  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]
ACCEPTANCE = ["pruner=taylor", "ratio=0.25", "layers.attention.start=3", "layers.attention.end=27",
              "layers.mlp.start=3", "layers.mlp.end=27", "data.num_samples=10", "data.seq_len=64",
              "pruner.taylor=param_first", "eval=none", "logger=none"]

FLOOR = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from core.data import TextSpec, calibration_batch, load_documents
from core.models import load_model
from recipes._common import resolve_model
model, tok = load_model(resolve_model("smollm2"), cache_dir=sys.argv[3])
batch = calibration_batch(tok, load_documents(TextSpec("austen"), cache_dir=sys.argv[3]), 10, 64, 0)
with torch.no_grad():
    model(input_ids=batch[:1, :8])  # warm-up
t0 = time.perf_counter()
model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
print(json.dumps({"fwd_bwd_s": time.perf_counter() - t0}))
"""


def _child(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak RSS GiB, stdout) of one child process."""
    c = run_child(cmd, ROOT, env)
    if c.returncode != 0:
        raise SystemExit(f"child failed ({c.returncode}): {' '.join(cmd)}")
    return c.wall_s, c.peak_rss_gib, c.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    walls, peaks, floors, splits = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            run_dir = Path(tmp) / f"run{i}"
            wall, peak, _ = _child([py, "run.py", *ACCEPTANCE, f"runtime.threads={args.threads}",
                                    f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}"], env)
            m = json.loads((run_dir / "metrics.json").read_text())
            assert m["status"] == "completed", m.get("error")
            t = m["timings"]
            known = {"startup": t["startup_s"], "validate_and_imports": t["validate_s"], "load": t["load_s"],
                     "prune": t["prune_s"], "save": t["save_s"], "analysis": t["analysis_s"]}
            known["other"] = wall - sum(known.values())
            walls.append(wall)
            peaks.append(peak)
            splits.append(known)
            _, _, out = _child([py, "-c", FLOOR, str(ROOT), str(args.threads), cache], env)
            floors.append(json.loads(out.strip().splitlines()[-1])["fwd_bwd_s"])
    wall, floor = statistics.median(walls), statistics.median(floors)
    split = {k: round(statistics.median(s[k] for s in splits), 3) for k in splits[0]}
    print(json.dumps({
        "bench": "process", "model": "SmolLM2-135M-Instruct", "threads": args.threads, "repeats": args.repeats,
        "command": "python run.py " + " ".join(ACCEPTANCE),
        "wall_s": round(wall, 3), "peak_rss_gib": round(statistics.median(peaks), 3),
        "fwd_bwd_floor_s": round(floor, 3), "wall_minus_floor_s": round(wall - floor, 3),
        "wall_over_floor": round(wall / floor, 3), "split_s": split,
        "targets": {"wall_minus_floor_s_max": 5.0, "peak_rss_gib_max": 1.6,
                    "met": wall - floor <= 5.0 and statistics.median(peaks) <= 1.6},
        "walls_s": [round(w, 2) for w in walls], "floors_s": [round(f, 2) for f in floors],
        "peer_reference": {"source": "layout issue, LLM-Pruner's script on the same model and text, 1 thread",
                           "wall_s_quiet": 15.0, "peak_rss_mib": 2350},
    }))


if __name__ == "__main__":
    main()
