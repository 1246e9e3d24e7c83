"""The seed's baseline comparison in one command on SmolLM2: five baselines + Taylor + the base model, one table.

    python run.py -cd multirun_sweeps -cn baselines

Run for real (a subprocess, as a user types it) with perplexity only and a small calibration batch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import CACHE_DIR, ROOT

pytestmark = pytest.mark.integration

JOBS = {"base", "Magnitude_2000", "Wanda_2000", "FLAP_2000", "ShortGPT_remove_7", "SliceGPT_2000", "Taylor_2000"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "sweep"
    env = {**os.environ, "PRUNELAB_CACHE": str(CACHE_DIR), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "run.py", "-cd", "multirun_sweeps", "-cn", "baselines", "eval=quick",
         "eval.generation.enabled=false", "eval.ppl.max_tokens=2048", "data.num_samples=8", "data.seq_len=64",
         "logger=none", f"hydra.sweep.dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)  # 7 jobs; a busy machine doubles it
    return out, proc


def test_every_baseline_in_one_table(sweep):
    out, proc = sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir() if p.is_dir() and (p / "metrics.json").exists()} == JOBS
    import pandas as pd

    df = pd.read_csv(out / "results.csv")
    assert set(df["status"]) == {"completed"}
    assert set(df["method"]) == {"base", "magnitude", "wanda", "flap", "shortgpt", "slicegpt", "taylor"}
    assert all(math.isfinite(v) and v > 1 for v in df["ppl"])
    rows = {r["method"]: r for r in df.to_dict("records")}
    base = rows["base"]
    for method in ("magnitude", "wanda"):  # zeros in dense shapes: same parameters, fewer non-zeros
        assert rows[method]["params"] == base["params"]
        assert rows[method]["nonzero_params"] < 0.85 * base["params"]
        assert rows[method]["unit"] == "sparsity"
    for method in ("flap", "shortgpt", "taylor"):  # structured: parameters really gone
        assert rows[method]["params"] < 0.9 * base["params"]
    # SliceGPT slices the hidden dimension, but on SmolLM2 the untied LM head (49k x 576) and the shortcut
    # matrices outweigh it: the table shows the parameter count as it is
    assert rows["slicegpt"]["unit"] == "slicing" and rows["slicegpt"]["params"] != base["params"]
    assert (out / "results.md").read_text().count("|") > 20


def test_batch_analysis_of_every_saved_model(sweep):
    out, proc = sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = json.loads((out / "batch_analysis_results.json").read_text())
    status = {m["name"]: m["status"] for m in batch["models"]}
    assert {k: v for k, v in status.items() if k != "base"} == {k: "ok" for k in JOBS - {"base"}}
    short = json.loads((out / "ShortGPT_remove_7" / "model" / "config.json").read_text())
    assert short["model_type"] == "llama" and short["num_hidden_layers"] == 23
