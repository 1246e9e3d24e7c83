"""The questions the seeds' analysis scripts answered (check_model_size.py, analyze_pruning.py,
batch_model_analysis.py), answered right: layers.csv tells norm rows from projections so the documented pandas
recipe finds the untouched layers and the undiluted per-layer sparsity; task=analyze prints its per-layer summary and
per-module dimensions, sizes in MiB and GiB; sizes count only the weight files the loader reads; task=table gives
every model's size on disk; models_summary.json reports a mask's reduction beside the structural one."""

from __future__ import annotations

import json
import logging
import re

import pandas as pd
import pytest
import torch

from analysis_helpers import base_and_pruned
from analysis.batch import batch_analyze
from analysis.report import write_analysis
from analysis.size import size_report
from analysis.structure import TensorInfo, structure_of
from conftest import ROOT, run_task
from core.models.checkpoint import save_checkpoint

HIDDEN, HEAD_DIM, Q_PER_KV, VOCAB = 64, 8, 2, 259
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": HEAD_DIM, "intermediate_size": 128,
          "num_hidden_layers": 4, "vocab_size": VOCAB, "tie_word_embeddings": False}


def llama_shapes(widths: list[tuple[int, int]]) -> dict[str, TensorInfo]:
    """A Llama's name -> shape (no weights) with (KV groups, MLP width) per layer: 2 query heads per group."""
    t = {"model.embed_tokens.weight": TensorInfo((VOCAB, HIDDEN), "float32"),
         "model.norm.weight": TensorInfo((HIDDEN,), "float32"), "lm_head.weight": TensorInfo((VOCAB, HIDDEN), "float32")}
    for i, (kv, inter) in enumerate(widths):
        p, q = f"model.layers.{i}.", kv * Q_PER_KV * HEAD_DIM
        shapes = {"self_attn.q_proj": (q, HIDDEN), "self_attn.k_proj": (kv * HEAD_DIM, HIDDEN),
                  "self_attn.v_proj": (kv * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, q),
                  "mlp.gate_proj": (inter, HIDDEN), "mlp.up_proj": (inter, HIDDEN), "mlp.down_proj": (HIDDEN, inter),
                  "input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,)}
        t.update({f"{p}{k}.weight": TensorInfo(v, "float32") for k, v in shapes.items()})
    return t


@pytest.fixture
def quarter(tmp_path):
    """Layers 1-2 pruned at 0.25 in every projection (1 KV group of 4, MLP 128 -> 96), layers 0 and 3 untouched:
    the seed's shape of result (analyze_pruning.py's layers 3..29 at ~0.16, the rest at 0)."""
    base = structure_of(llama_shapes([(4, 128)] * 4), config=CONFIG, name="base")
    pruned = structure_of(llama_shapes([(4, 128), (3, 96), (3, 96), (4, 128)]), config=CONFIG, name="pruned")
    out = tmp_path / "analysis"
    summary = write_analysis(out, pruned, base)
    return out, summary, base, pruned


def _recipe() -> str:
    doc = (ROOT / "docs" / "analysis.md").read_text()
    block = re.search(r"<!-- layers-csv-recipe:begin -->\n```python\n(.*?)```\n<!-- layers-csv-recipe:end -->", doc,
                      re.S)
    assert block, "docs/analysis.md lost its layers.csv recipe"
    return block.group(1)


def test_the_documented_recipe_finds_untouched_layers_and_the_undiluted_sparsity(quarter):
    out, *_ = quarter
    df = pd.read_csv(out / "layers.csv")
    assert len(df) == 4 * 9 and set(df["kind"]) == {"matrix", "norm"}
    assert (df[df.kind == "norm"]["module"].unique().tolist() == ["input_layernorm", "post_attention_layernorm"])
    assert (df[df.kind == "norm"]["sparsity"] == 0).all()  # what made the old recipe wrong
    # the seed's recipe over every row: every layer has a sparsity-0 row, and the mean of a 0.25 layer is diluted
    assert sorted(df[df.sparsity == 0].layer_idx.unique()) == [0, 1, 2, 3]
    assert df.groupby("layer_idx")["sparsity"].mean()[1] == pytest.approx(7 * 0.25 / 9)  # 0.194, the docs say
    # the recipe the docs give, run as written on this layers.csv
    ns: dict = {}
    exec(_recipe().replace("outputs/2026-11-22/10-48-13/analysis/layers.csv", str(out / "layers.csv")), ns)
    assert ns["untouched"] == [0, 3]
    assert ns["per_layer"].to_dict() == pytest.approx({0: 0.0, 1: 0.25, 2: 0.25, 3: 0.0})
    assert len(ns["one_layer"]) == 7 and set(ns["by_module"].index) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sorted(ns["outliers"].layer_idx.unique()) == [1, 2] and len(ns["outliers"]) == 2 * 7


def test_the_sparsity_plot_leaves_norms_out(quarter):
    _, _, base, pruned = quarter
    from analysis.compare import compare
    from analysis.plots import layer_sparsity

    bars = layer_sparsity(compare(base, pruned))
    assert bars["layer"].tolist() == pytest.approx([0.0, 0.25, 0.25, 0.0])  # not 0.25 x (1 - norm share)
    assert bars["attention"].tolist() == pytest.approx([0.0, 0.25, 0.25, 0.0])


def test_summary_has_the_per_module_dimension_table(quarter):
    out, *_ = quarter
    text = (out / "structure_summary.txt").read_text()
    assert "Per-module dimensions (original -> compressed)" in text
    section = text.split("Per-module dimensions", 1)[1]
    lines = [ln.split() for ln in section.splitlines()]
    q = section.split("attention.q_proj\n", 1)[1].splitlines()
    assert q[1].split() == ["0", "64", "x", "64", "->", "64", "x", "64", "1.0000", "0.0000", "n/a"]
    assert q[2].split() == ["1-2", "64", "x", "64", "->", "48", "x", "64", "0.7500", "0.2500", "n/a"]
    assert q[3].split() == ["3", "64", "x", "64", "->", "64", "x", "64", "1.0000", "0.0000", "n/a"]
    down = section.split("mlp.down_proj\n", 1)[1].splitlines()
    assert down[2].split()[:8] == ["1-2", "64", "x", "128", "->", "64", "x", "96"]
    assert not any("layernorm" in " ".join(ln) for ln in lines)  # norms are not dimensions anyone pruned


def _hf_download(root, model):
    """A Hugging Face download as the seeds used it: safetensors + config, and Meta's original/consolidated.00.pth
    (the same weights again, which the loader never reads)."""
    model.save_pretrained(root)
    (root / "original").mkdir()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, root / "original" / "consolidated.00.pth")
    return root


def test_size_counts_only_the_weight_files_the_loader_reads(tmp_path):
    base, pruned, tok = base_and_pruned()
    hf = _hf_download(tmp_path / "Llama-like", base)
    rep = size_report(hf, structure_of(hf, name="b"))
    files = {f["file"]: f for f in rep["files"]}
    consolidated = files["original/consolidated.00.pth"]["bytes"]
    weights = files["model.safetensors"]["bytes"]
    assert files["original/consolidated.00.pth"]["category"] == "unread"
    assert rep["bytes_by_category"]["weights"] == weights  # not weights + consolidated (twice the model)
    assert rep["unread_weight_bytes"] == consolidated
    assert rep["total_bytes"] == sum(f["bytes"] for f in rep["files"]) - consolidated
    assert any("original/consolidated.00.pth" in e for e in rep["explanation"])
    # in the analysis of a pruned model against it: the base total is the loaded model's, and sizes read in GiB
    ckpt = save_checkpoint(pruned, tok, tmp_path / "pruned", {"method": "test"})
    summary = write_analysis(tmp_path / "a", structure_of(ckpt, name="p"), structure_of(hf, name="b"),
                             model_dir=ckpt, base_model_dir=hf)
    cmp = json.loads((tmp_path / "a" / "model_comparison.json").read_text())
    assert cmp["size"]["original_total_bytes"] == rep["total_bytes"]
    text = (tmp_path / "a" / "structure_summary.txt").read_text()
    gib = rep["total_bytes"] / 1024 ** 3
    assert f"original total     : {rep['total_bytes'] / 1024 ** 2:,.2f} MiB ({gib:.2f} GiB)" in text
    assert "compressed total   :" in text and "reduced on disk    :" in text and "GiB" in text
    assert summary["size_bytes"] == size_report(ckpt)["total_bytes"]


def test_analyze_prints_its_per_layer_summary(tmp_path, caplog):
    base, pruned, tok = base_and_pruned()
    ckpt = save_checkpoint(pruned, tok, tmp_path / "model", {"method": "test"})
    with caplog.at_level(logging.INFO, logger="recipes.analyze"):
        _, m = run_task(["task=analyze", f"model={ckpt}", "base=tiny", "logger=none"], tmp_path / "run")
    assert m["status"] == "completed"
    printed = "\n".join(r.getMessage() for r in caplog.records if r.name == "recipes.analyze")
    text = (tmp_path / "run" / "analysis" / "structure_summary.txt").read_text()
    assert text in printed  # the whole report, as analyze_pruning.py printed it
    for needle in ("Comparison with tiny", "overall sparsity", "Per-module dimensions", "retention"):
        assert needle in printed


def test_table_gives_every_model_its_size_on_disk(tmp_path):
    """check_model_size.py with no arguments (every pruned model): task=table over the outputs, one size per row."""
    base, pruned, tok = base_and_pruned()
    outputs = tmp_path / "outputs"
    ev = {"ppl": {"value": 30.0, "seq_len": 128, "tokens": 1000, "source": "wikitext"}}
    run = outputs / "prune_run"
    save_checkpoint(pruned, tok, run / "model", {"method": "taylor"})
    (run / "metrics.json").write_text(json.dumps({
        "status": "completed", "task": "prune", "method": "taylor", "config": {"ratio": 0.25, "model": {"name": "t"}},
        "params": {"base": 10, "pruned": 8, "kept_pct": 80.0}, "eval": {"base": ev, "pruned": ev}}))
    hybrid = outputs / "replace_run"  # task=replace saves into its named folder (output_name), recorded as the path
    save_checkpoint(pruned, tok, hybrid / "llama_replaced_1_3", {"method": "replace"})
    (hybrid / "metrics.json").write_text(json.dumps({
        "status": "completed", "task": "replace", "method": "replace", "config": {"model": {"name": "t"}},
        "checkpoint": {"path": "/elsewhere/when/it/ran/llama_replaced_1_3", "bytes": 1}, "eval": {"model": ev}}))
    hf = _hf_download(tmp_path / "download", base)  # an evaluate run of a download: its original/ copy not counted
    (outputs / "eval_run").mkdir()
    (outputs / "eval_run" / "metrics.json").write_text(json.dumps({
        "status": "completed", "task": "evaluate", "model": {"name": "download", "path": str(hf)},
        "eval": {"model": ev}}))
    _, m = run_task(["task=table", "logger=none", f"paths.outputs_root={outputs}"], tmp_path / "table")
    assert m["status"] == "completed"
    df = pd.read_csv(tmp_path / "table" / "results.csv")
    taylor = df[df["method"] == "taylor"].iloc[0]
    assert taylor["model_bytes"] == size_report(run / "model")["total_bytes"]
    assert taylor["model_GiB"] == pytest.approx(taylor["model_bytes"] / 1024 ** 3)
    replaced = df[df["method"] == "replace"].iloc[0]  # measured in the run dir (it may have moved), not recorded
    assert replaced["model_bytes"] == size_report(hybrid / "llama_replaced_1_3")["total_bytes"]
    download = df[df["model"] == "download"].iloc[0]
    assert download["model_bytes"] == size_report(hf)["total_bytes"]
    assert download["model_bytes"] < sum(p.stat().st_size for p in hf.rglob("*") if p.is_file())
    assert "model_bytes" in (tmp_path / "table" / "results.md").read_text().splitlines()[0]


def test_models_summary_reports_a_masks_reduction(tmp_path):
    """A Wanda / magnitude model keeps every parameter: models_summary.json's structural reduction_ratio is 0, and
    the share of non-zero weights gone is beside it under its own name."""
    base, pruned, tok = base_and_pruned()
    masked = base_and_pruned()[0]
    zeroed = 0
    with torch.no_grad():
        for layer in masked.model.layers:  # the smallest 20% of each projection's weights, per row (Wanda's scope)
            for lin in (*[getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")],
                        *[getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]):
                k = int(0.2 * lin.weight.shape[1])
                idx = lin.weight.abs().argsort(dim=1)[:, :k]
                lin.weight.scatter_(1, idx, 0.0)
                zeroed += k * lin.weight.shape[0]
    models = tmp_path / "baselines"
    masked.save_pretrained(models / "Wanda_2000")
    save_checkpoint(pruned, tok, models / "Taylor_2500", {"method": "taylor"})
    b = structure_of(base, name="base", count_nonzero=True)
    batch_analyze(models, b, tmp_path / "run", count_nonzero=True)
    summary = {m["name"]: m for m in json.loads((tmp_path / "run" / "models_summary.json").read_text())["models"]}
    wanda = summary["Wanda_2000"]["pruning"]
    assert wanda["reduction_ratio"] == 0.0 and wanda["structural_reduction_ratio"] == 0.0
    assert wanda["original_nonzero"] == b.nonzero_params and wanda["pruned_nonzero"] == b.nonzero_params - zeroed
    assert wanda["nonzero_reduction_ratio"] == pytest.approx(zeroed / b.nonzero_params)
    assert wanda["nonzero_reduction_ratio"] > 0.1
    taylor = summary["Taylor_2500"]["pruning"]  # a structural prune: both say about the same
    assert taylor["reduction_ratio"] > 0 and taylor["nonzero_reduction_ratio"] == pytest.approx(
        taylor["reduction_ratio"], abs=1e-3)
    batch = json.loads((tmp_path / "run" / "batch_analysis_results.json").read_text())
    w = next(m for m in batch["models"] if m["name"] == "Wanda_2000")["summary"]
    assert w["reduction_ratio"] == 0.0 and w["nonzero_reduction_ratio"] == pytest.approx(zeroed / b.nonzero_params)
    # shapes only (count_nonzero=false): the non-zero reduction is unknown, never a 0 that reads as "nothing gone"
    batch_analyze(models, structure_of(base, name="base"), tmp_path / "run2", count_nonzero=False)
    s2 = json.loads((tmp_path / "run2" / "models_summary.json").read_text())["models"]
    assert next(m for m in s2 if m["name"] == "Wanda_2000")["pruning"]["nonzero_reduction_ratio"] is None
