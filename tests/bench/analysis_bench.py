"""Time and peak memory to analyse a SmolLM2 checkpoint: safetensors headers vs loading the model.

    python tests/bench/analysis_bench.py [--path <HF or prunelab dir>]   # default: the cached SmolLM2 dir

Each mode runs in a fresh subprocess so peak RSS (ru_maxrss) is its own. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import record  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
import torch
from analysis.structure import structure_of
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t_import = time.perf_counter() - t0
mode, path = {mode!r}, {path!r}
t0 = time.perf_counter()
if mode == "headers":
    s = structure_of(path, name="m")
elif mode == "headers_nonzero":
    s = structure_of(path, name="m", count_nonzero=True)
else:
    from core.models.load import load_hf_dir
    from pathlib import Path
    model, _ = load_hf_dir(Path(path))
    s = structure_of(model, name="m", count_nonzero=(mode == "load_nonzero"))
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": dt, "peak_rss_mb": peak / 1024, "rss_after_import_mb": base_rss / 1024,
                  "total_params": s.total_params, "num_layers": s.num_layers}}))
"""


def run_mode(mode: str, path: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT), mode=mode, path=path)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--path", default=None, help="model dir (default: cached SmolLM2, converted once if absent)")
    args = ap.parse_args()
    path = args.path
    if path is None:
        sys.path.insert(0, str(ROOT))
        from core.models.load import cached_gguf_dir
        from recipes._common import resolve_model

        cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
        path = str(cached_gguf_dir(resolve_model("smollm2"), cache))
    res = {m: run_mode(m, path) for m in ("headers", "headers_nonzero", "load", "load_nonzero")}
    assert len({r["total_params"] for r in res.values()}) == 1, "modes disagree on the parameter count"
    h, ld = res["headers"], res["load"]
    record({
        "bench": "analysis_structure", "model": Path(path).name, "total_params": h["total_params"],
        "num_layers": h["num_layers"],
        "headers_s": round(h["seconds"], 4), "headers_peak_rss_mb": round(h["peak_rss_mb"], 1),
        "headers_nonzero_s": round(res["headers_nonzero"]["seconds"], 3),
        "headers_nonzero_peak_rss_mb": round(res["headers_nonzero"]["peak_rss_mb"], 1),
        "load_s": round(ld["seconds"], 3), "load_peak_rss_mb": round(ld["peak_rss_mb"], 1),
        "load_nonzero_s": round(res["load_nonzero"]["seconds"], 3),
        "load_nonzero_peak_rss_mb": round(res["load_nonzero"]["peak_rss_mb"], 1),
        "rss_after_imports_mb": round(h["rss_after_import_mb"], 1),
        "speedup_headers_vs_load": round(ld["seconds"] / max(h["seconds"], 1e-9), 1),
    }, __file__, threads=1)


if __name__ == "__main__":
    main()
