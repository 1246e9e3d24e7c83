"""Comparison with the base, consistency report, size report and the files write_analysis produces."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from analysis_helpers import (ATTN_FULL, ATTN_L1, BASE_TOTAL, LAYER1, LAYER2, LAYER_FULL, MLP_96, MLP_FULL,
                              PRUNED_TOTAL, base_and_pruned, state_dict_copy, tiny)
from analysis.compare import ArchitectureMismatch, compare
from analysis.report import write_analysis
from analysis.size import compare_sizes, size_report
from analysis.structure import structure_of
from core.models.checkpoint import save_checkpoint
from core.run.record import RunContext


@pytest.fixture(scope="module")
def pair():
    base, pruned, tok = base_and_pruned()
    return structure_of(base, name="base"), structure_of(pruned, name="pruned"), base, pruned, tok


def test_comparison_exact(pair):
    b, p, *_ = pair
    c = compare(b, p, expected_ranges={"attention": [1, 2], "mlp": [1, 3]}, target_sparsity=0.2)
    t = c["total_params"]
    assert (t["original"], t["pruned"], t["reduced"]) == (BASE_TOTAL, PRUNED_TOTAL, BASE_TOTAL - PRUNED_TOTAL)
    assert t["reduction_ratio"] == pytest.approx((BASE_TOTAL - PRUNED_TOTAL) / BASE_TOTAL)
    assert t["retention"] + t["sparsity"] == pytest.approx(1.0)
    l1 = c["layers"][1]
    assert l1["total"]["original"] == LAYER_FULL and l1["total"]["pruned"] == LAYER1
    assert l1["total"]["retention"] == pytest.approx(LAYER1 / LAYER_FULL)
    assert l1["attention"]["total"]["pruned"] == ATTN_L1 and l1["attention"]["total"]["original"] == ATTN_FULL
    q = l1["attention"]["q_proj"]
    assert (q["original_shape"], q["pruned_shape"], q["retention"], q["sparsity"]) == ([64, 64], [32, 64], 0.5, 0.5)
    assert l1["attention"]["num_heads"] == {"original": 8, "pruned": 4}
    assert l1["attention"]["num_kv_heads"] == {"original": 2, "pruned": 1}
    assert l1["mlp"]["intermediate_size"] == {"original": 128, "pruned": 96}
    assert l1["mlp"]["total"]["retention"] == pytest.approx(MLP_96 / MLP_FULL) == 0.75
    assert c["layers"][2]["total"]["pruned"] == LAYER2
    assert [e["status"] for e in c["layers"]] == ["untouched", "pruned", "pruned", "untouched"]
    cons = c["consistency"]
    assert cons["modules"]["attention.q_proj"] == {"consistent": True, "retention": 0.5,
                                                   "retention_by_layers": {"0.5000": [1]}}
    assert cons["modules"]["mlp.gate_proj"]["retention_by_layers"] == {"0.7500": [1, 2]}
    assert cons["all_modules_consistent"] and cons["untouched_layers"] == [0, 3]
    assert cons["pruned_layers"] == {"attention": [1], "mlp": [1, 2]}
    assert cons["ranges"]["attention"]["ok"] and cons["ranges"]["mlp"]["ok"] and cons["ok"]
    assert cons["hidden_dim_changes"] == [] and cons["verdicts"] == []
    mean = ((1 - LAYER1 / LAYER_FULL) + (1 - LAYER2 / LAYER_FULL)) / 2
    assert cons["pruned_layers_mean_sparsity"] == pytest.approx(mean)
    assert cons["target_gap"] == pytest.approx(mean - 0.2)


def test_range_and_consistency_verdicts(pair):
    b, _, base, *_ = pair
    import copy

    m = copy.deepcopy(base)
    from analysis_helpers import _rows, _cols

    for i, keep in ((0, 112), (2, 96)):  # layer 0 outside the range, different widths
        _rows(m.model.layers[i].mlp.gate_proj, keep)
        _rows(m.model.layers[i].mlp.up_proj, keep)
        _cols(m.model.layers[i].mlp.down_proj, keep)
    c = compare(b, structure_of(m, name="odd"), expected_ranges={"mlp": [1, 3]})["consistency"]
    assert c["ranges"]["mlp"] == {"expected": [1, 3], "pruned_outside_range": [0], "untouched_inside_range": [1],
                                  "ok": False}
    assert not c["modules"]["mlp.gate_proj"]["consistent"]
    assert c["modules"]["mlp.gate_proj"]["retention_by_layers"] == {"0.8750": [0], "0.7500": [2]}
    assert not c["ok"] and len(c["verdicts"]) == 3


def test_removed_layers_renumbered_and_unstructured(pair):
    b, _, base, *_ = pair
    sd = state_dict_copy(base)
    # ShortGPT: drop layer 1, renumber 2->1, 3->2, record it
    out = {}
    for k, v in sd.items():
        if k.startswith("model.layers.1."):
            continue
        for old, new in ((2, 1), (3, 2)):
            k = k.replace(f"model.layers.{old}.", f"model.layers.{new}.")
        out[k] = v
    cfg = dict(base.config.to_dict(), num_hidden_layers=3, removed_layers=[1])
    c = compare(b, structure_of(out, config=cfg, name="short"))
    assert [e["status"] for e in c["layers"]] == ["untouched", "removed", "untouched", "untouched"]
    assert c["layers"][1]["total"]["pruned"] == 0 and c["layers"][1]["is_zero_layer"]
    assert c["layers"][3]["pruned_layer_idx"] == 2 and c["consistency"]["removed_layers"] == [1]
    # without the record: the same layers found by matching their weights with the base's, and said so
    cfg.pop("removed_layers")
    c2 = compare(b, structure_of(out, config=cfg, name="short"))
    assert [e["status"] for e in c2["layers"]] == ["untouched", "removed", "untouched", "untouched"]
    assert "not recorded" in c2["alignment_notes"][0] and "found by matching" in c2["alignment_notes"][0]
    # Wanda-like: same shapes, half of layer 2's q_proj zeroed
    sd = state_dict_copy(base)
    sd["model.layers.2.self_attn.q_proj.weight"][:, ::2] = 0
    s = structure_of(sd, config=base.config.to_dict(), name="wanda", count_nonzero=True)
    c3 = compare(b, s)
    assert [e["status"] for e in c3["layers"]] == ["untouched", "untouched", "sparsified", "untouched"]
    q = c3["layers"][2]["attention"]["q_proj"]
    assert q["sparsity"] == 0 and q["nonzero_sparsity"] == 0.5
    assert c3["consistency"]["modules"]["attention.q_proj"]["retention"] == 0.5


def test_architecture_mismatch(pair):
    b, *_ = pair
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2))
    with pytest.raises(ArchitectureMismatch, match="vocabularies differ"):
        compare(b, structure_of(other, name="other"))
    gpt = structure_of({"transformer.h.0.attn.c_attn.weight": ((64, 192), "float32")}, name="gpt")
    with pytest.raises(ArchitectureMismatch, match="no module in common"):
        compare(b, gpt)


def test_size_report_explains(tmp_path, pair):
    *_, base, pruned, tok = pair
    bdir = save_checkpoint(base, tok, tmp_path / "base", {"method": "none"})
    pdir = save_checkpoint(pruned.to(torch.float16), tok, tmp_path / "pruned", {"method": "known"})
    bs, ps = structure_of(bdir, name="b"), structure_of(pdir, name="p")
    br, pr = size_report(bdir, bs), size_report(pdir, ps)
    st = (pdir / "model.safetensors").stat().st_size
    assert pr["param_bytes"] == {"fp32": 4 * PRUNED_TOTAL, "fp16": 2 * PRUNED_TOTAL, "bf16": 2 * PRUNED_TOTAL,
                                 "stored": 2 * PRUNED_TOTAL}
    header = int.from_bytes((pdir / "model.safetensors").read_bytes()[:8], "little") + 8
    assert pr["weight_file_overhead_bytes"] == st - 2 * PRUNED_TOTAL == header
    assert pr["bytes_by_category"]["tokenizer"] > 0 and pr["total_bytes"] == sum(f["bytes"] for f in pr["files"])
    cmp = compare_sizes(br, pr)
    assert cmp["params_reduction"] == pytest.approx((BASE_TOTAL - PRUNED_TOTAL) / BASE_TOTAL)
    assert any("dtype mismatch" in e for e in cmp["explanation"])
    assert any("do not shrink" in e for e in cmp["explanation"])


def test_write_analysis_files_and_wandb_tables(tmp_path, pair):
    b, p, *_ = pair
    ctx = RunContext(tmp_path / "run", task="analyze")
    tables, images = {}, {}
    ctx.log_table = lambda name, df: tables.__setitem__(name, df)  # what W&B would receive
    ctx.log_image = lambda name, path: images.__setitem__(name, path)
    out = tmp_path / "run" / "analysis"
    summary = write_analysis(out, p, b, expected_ranges={"attention": [1, 2], "mlp": [1, 3]}, target_sparsity=0.25,
                             ctx=ctx)
    for f in ("model_structure.json", "model_comparison.json", "structure_summary.txt", "layers.csv",
              "sparsity.png", "module_heatmap.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "layers.csv")))
    assert len(rows) == 4 * 9  # 4 layers x (7 projections + 2 norms)
    r = next(r for r in rows if r["layer_idx"] == "1" and r["module"] == "k_proj")
    assert (r["original_shape"], r["pruned_shape"], r["retention"], r["sparsity"]) == ("16 x 64", "8 x 64", "0.5", "0.5")
    comp = json.loads((out / "model_comparison.json").read_text())
    assert comp["original_name"] == "base" and "_rows" not in comp
    assert set(comp["layers"][0]) >= {"layer_idx", "total", "attention", "mlp", "is_zero_layer"}
    text = (out / "structure_summary.txt").read_text()
    assert "OK   attention.q_proj: same retention 0.5 in layers 1" in text and "untouched layers   : 0, 3" in text
    assert summary["total_params"] == PRUNED_TOTAL and summary["consistency_ok"]
    assert set(tables) == {"analysis/layers", "analysis/layer_totals"} and len(tables["analysis/layers"]) == 36
    assert set(images) == {"analysis/sparsity", "analysis/module_heatmap"}
    assert json.loads(ctx.path.read_text())["analysis"]["retention"] == pytest.approx(PRUNED_TOTAL / BASE_TOTAL)


def test_write_analysis_mismatch_does_not_crash(tmp_path, pair):
    _, p, *_ = pair
    from transformers import LlamaConfig, LlamaForCausalLM

    other = structure_of(LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=2, num_attention_heads=8,
                                                      num_key_value_heads=2)), name="other")
    summary = write_analysis(tmp_path, p, other)
    assert "vocabularies differ" in summary["comparison_error"]
    assert (tmp_path / "model_structure.json").is_file() and not (tmp_path / "model_comparison.json").exists()
    assert "comparison with the base skipped" in (tmp_path / "structure_summary.txt").read_text()
