"""Efficiency measurement and the results table, on tiny models and synthetic run dirs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from analysis.efficiency import measure_efficiency, size_stats
from analysis.results_table import collect, rows_from_metrics, write_tables


def _tiny(intermediate: int = 128):
    from core.models.load import build_tiny

    return build_tiny(num_layers=2, hidden_size=64, intermediate_size=intermediate, num_heads=8, num_kv_heads=2)


def test_size_stats_counts_zeros_ties_and_disk(tmp_path):
    model, tok = _tiny()
    s = size_stats(model)
    expected = sum(p.numel() for p in model.parameters())
    assert s["params"] == expected and s["weight_bytes"] == 4 * expected and "disk_bytes" not in s
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:10].zero_()  # 10 rows x 64 inputs
    zeroed = size_stats(model)
    assert s["nonzero_params"] - zeroed["nonzero_params"] == 10 * 64
    model.save_pretrained(tmp_path / "ckpt")
    on_disk = size_stats(model, tmp_path / "ckpt")
    assert on_disk["disk_weight_bytes"] >= on_disk["weight_bytes"] and on_disk["disk_bytes"] > on_disk["disk_weight_bytes"]


def test_efficiency_base_vs_smaller_model_same_protocol():
    torch.set_num_threads(1)
    base, _ = _tiny(128)
    small, _ = _tiny(32)
    kw = dict(prompt_len=16, batch_size=2, decode_tokens=3, warmup=1, repeats=2)
    eb, es = measure_efficiency(base, **kw), measure_efficiency(small, **kw)
    for e in (eb, es):
        assert e["prefill_tokens_per_s"] > 0 and e["decode_tokens_per_s"] > 0 and e["decode_latency_ms"] > 0
        assert e["prompt_len"] == 16 and e["batch_size"] == 2 and e["repeats"] == 2 and e["peak_memory_bytes"] >= 0
        assert math.isclose(e["prefill_tokens_per_s"], 32 / e["prefill_seconds"])
    assert es["params"] < eb["params"]
    # KV cache: layers x (k, v) x batch x kv_heads x (prompt + decoded) positions x head_dim x fp32
    assert eb["kv_cache_bytes"] == es["kv_cache_bytes"] == 2 * 2 * 2 * 2 * (16 + 3) * 8 * 4
    assert eb["peak_memory_bytes"] == eb["weight_bytes"] + eb["kv_cache_bytes"]  # CPU definition
    assert es["peak_memory_bytes"] < eb["peak_memory_bytes"]
    with pytest.raises(ValueError):
        measure_efficiency(base, prompt_len=0)


def _prune_metrics(method, ratio, start, end, ppl_b, ppl_p, avg, kept):
    ev = lambda ppl, acc: {"ppl": {"value": ppl, "seq_len": 128, "tokens": 4064, "source": "boolq"},
                           "tasks": {"boolq": {"acc": acc, "status": "completed"},
                                     "hellaswag": {"acc": 0.1, "acc_norm": acc, "status": "completed"}},
                           "task_average": acc, "mmlu": {"average": 0.25, "num_fewshot": 5},
                           "efficiency": {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0}}
    return {"status": "completed", "task": "prune", "method": method,
            "config": {"ratio": ratio, "model": {"name": "smollm2"},
                       "layers": {"attention": {"start": start, "end": end}, "mlp": {"start": start, "end": end}}},
            "params": {"base": 1000, "pruned": int(10 * kept), "kept_pct": kept},
            "eval": {"base": ev(ppl_b, 0.6), "pruned": ev(ppl_p, avg)}}


def test_table_from_runs(tmp_path):
    runs = tmp_path / "outputs"
    specs = [("taylor", 0.5, 3, 30, 20.0, 40.0, 0.4, 60.0), ("l2", 0.25, 3, 30, 20.0, 30.0, 0.5, 80.0),
             ("taylor", 0.25, 3, 30, 20.0, 25.0, 0.55, 80.0)]
    for i, s in enumerate(specs):
        (runs / f"r{i}").mkdir(parents=True)
        (runs / f"r{i}" / "metrics.json").write_text(json.dumps(_prune_metrics(*s)))
    # an evaluate run with missing pieces and a failed perplexity (null) must not break the table
    (runs / "e").mkdir()
    (runs / "e" / "metrics.json").write_text(json.dumps({
        "status": "completed", "task": "evaluate", "method": "wanda", "model": {"name": "ckpt"},
        "eval": {"model": {"ppl": {"value": None, "seq_len": 128, "source": "boolq", "status": "failed"}}}}))
    (runs / "broken").mkdir()
    (runs / "broken" / "metrics.json").write_text("{not json")
    df = collect([runs])
    assert df.iloc[0]["method"] == "base" and (df["method"] == "base").sum() == 1  # deduplicated, first
    assert list(df["method"][1:]) == ["l2", "taylor", "taylor", "wanda"]
    assert list(df["ratio"][2:4]) == [0.25, 0.5]
    row = df[(df["method"] == "taylor") & (df["ratio"] == 0.5)].iloc[0]
    assert row["params_kept_pct"] == 60.0 and row["attn_layers"] == "3-30" and row["ppl"] == 40.0
    assert row["BoolQ"] == pytest.approx(40.0) and row["HellaSwag"] == pytest.approx(40.0)  # acc_norm headline
    assert row["avg"] == pytest.approx(40.0) and row["MMLU"] == 25.0 and "boolq, seq_len 128" in row["ppl_protocol"]
    assert pd.isna(df[df["method"] == "wanda"].iloc[0]["ppl"])
    files = write_tables(df, tmp_path / "table")
    md = open(files["markdown"]).read().splitlines()
    assert md[0].startswith("| model | method") and len(md) == 2 + len(df)
    assert "\\begin{tabular}" in open(files["latex"]).read()
    assert len(pd.read_csv(files["csv"])) == len(df)
    assert rows_from_metrics({"status": "failed", "task": "prune"}, "x") == []


def test_base_rows_from_different_runs_merge_unless_they_disagree():
    from analysis.results_table import _merge_base_rows

    nan = float("nan")
    base = pd.DataFrame([
        {"model": "smollm2", "params": 10, "ppl": 26.9, "ppl_protocol": "boolq 128", "PIQA": nan, "MMLU": nan,
         "limit": nan, "run": "a", "status": "completed"},
        {"model": "smollm2", "params": 10, "ppl": 26.9, "ppl_protocol": "boolq 128", "PIQA": 68.0, "MMLU": nan,
         "limit": 50.0, "run": "b", "status": "completed"},
        {"model": "smollm2", "params": 10, "ppl": nan, "ppl_protocol": nan, "PIQA": nan, "MMLU": 23.9,
         "limit": 5.0, "run": "c", "status": "completed"},
        {"model": "smollm2", "params": 10, "ppl": 20.4, "ppl_protocol": "boolq 512", "PIQA": nan, "MMLU": nan,
         "limit": nan, "run": "d", "status": "completed"},  # another protocol: its own row
    ])
    out = _merge_base_rows(base)
    assert len(out) == 2
    first = out.iloc[0]
    assert (first["ppl"], first["PIQA"], first["MMLU"]) == (26.9, 68.0, 23.9)
    assert first["limit"] == "5/50" and first["run"] == "a; b; c"
    assert out.iloc[1]["ppl"] == 20.4 and out.iloc[1]["run"] == "d"


def test_a_recovered_run_gives_its_pruned_and_its_recovered_row(tmp_path):
    m = _prune_metrics("taylor", 0.25, 3, 27, 20.0, 40.0, 0.4, 80.0)
    m["config"]["recovery"] = {"name": "lora"}
    m["eval"]["recovered"] = {"ppl": {"value": 28.0, "seq_len": 128, "tokens": 4064, "source": "boolq"}}
    rows = rows_from_metrics(m, "r")
    assert [r["method"] for r in rows] == ["base", "taylor", "taylor+lora"]
    pruned, recovered = rows[1], rows[2]
    assert pruned["ppl"] == 40.0 and recovered["ppl"] == 28.0 and recovered["params"] == pruned["params"]
    assert pruned["BoolQ"] == pytest.approx(40.0) and recovered.get("BoolQ") is None  # not measured after: empty
