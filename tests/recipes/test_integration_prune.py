"""End to end on the embedded SmolLM2-135M-Instruct (real pretrained weights, offline)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.integration


def test_taylor_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    # The foundation issue's acceptance command (+ W&B offline and a shorter perplexity text).
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "pruner=taylor", "ratio=0.25", "logger=wandb", "data=austen",
                           "layers.attention.start=3", "layers.attention.end=27", "layers.mlp.start=3",
                           "layers.mlp.end=27", "data.num_samples=10", "data.seq_len=64", "pruner.taylor=param_first",
                           "eval.ppl.max_tokens=1024", "eval.generation.max_new_tokens=8", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "completed", m.get("error")
    log = (run_dir / "run.log").read_text()
    assert "PPL base" in log and "PPL pruned" in log and "run dir:" in log
    base, pruned = m["eval"]["base"]["ppl"], m["eval"]["pruned"]["ppl"]
    assert math.isfinite(base["value"]) and math.isfinite(pruned["value"])
    assert base["value"] < pruned["value"] < 4 * base["value"]
    assert base["seq_len"] == 128 and base["source"] == "boolq"
    assert m["data"]["calibration"]["source"] == "austen"
    # LLM-Pruner's count for this configuration: 0.25 x 3 KV groups floors to 0 heads, MLP 1536 -> 1152 in 24 layers.
    assert m["params"] == {"base": 134_515_008, "pruned": 118_589_760, "kept_pct": pytest.approx(88.16, abs=0.01),
                           "removed_pct": pytest.approx(11.84, abs=0.01),
                           # the base model already holds 325,128 weights that are exactly zero
                           "nonzero_base": 134_189_880, "nonzero": 118_269_551,
                           "sparsity_pct": pytest.approx(11.86, abs=0.01)}
    assert m["flops"]["per_token"] < m["flops"]["per_token_base"] and m["flops"]["context"] == 128
    assert m["pruning"]["heads_pruned"] is False and m["pruning"]["notes"]
    assert "Paris" in m["eval"]["base"]["generation"]["output"]
    for name in ("analysis/model_structure.json", "analysis/layers.csv", "analysis/sparsity.png", ".hydra/config.yaml", ".hydra/overrides.yaml", "model/model.safetensors", "model/config.json",
                 "model/checkpoint_info.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "wandb").glob("offline-run-*")), "offline W&B run missing"

    from core.models.load import load_model
    from core.models.ref import ModelRef

    model, tok = load_model(ModelRef.of({"name": "ck", "kind": "hf", "path": str(run_dir / "model"), "dtype": "float32",
                             "device": "cpu"}), cache_dir=".cache")
    cfg = json.loads((run_dir / "model" / "config.json").read_text())
    assert [l["intermediate_size"] for l in cfg["layer_configs"]] == [1536] * 3 + [1152] * 24 + [1536] * 3
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    assert torch.isfinite(model(**ids).logits).all()


def test_default_run_beats_llm_pruner_settings(tmp_path):
    """`python run.py pruner=taylor ratio=0.25` with the defaults (param_second, 16 x 128 calibration tokens).

    On this evaluation text LLM-Pruner's own settings (param_first, 10 x 64) end at 1.75 x the base perplexity
    (tests/bench/prune_bench.py), the defaults at 1.63 x: the bound fails if the defaults regress to them.
    """
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "pruner=taylor", "ratio=0.25", "logger=none",
                           "save_model=false", "eval.generation.enabled=false", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "completed", m.get("error")
    assert m["config"]["pruner"]["taylor"] == "param_second"
    assert (m["data"]["calibration"]["num_samples"], m["data"]["calibration"]["seq_len"]) == (16, 128)
    base, pruned = m["eval"]["base"]["ppl"]["value"], m["eval"]["pruned"]["ppl"]["value"]
    assert m["params"]["pruned"] == 118_589_760
    assert 1.0 < pruned / base < 1.70, (base, pruned)
    assert not (run_dir / "model").exists()
