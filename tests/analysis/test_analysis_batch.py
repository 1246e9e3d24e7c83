"""Batch analysis of a mixed folder (one broken model inside) and the analyze / batch_analyze tasks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from analysis_helpers import BASE_TOTAL, PRUNED_TOTAL, Tok, base_and_pruned, state_dict_copy
from analysis.batch import batch_analyze
from analysis.structure import structure_of
from conftest import run_task
from core.models.checkpoint import save_checkpoint
from core.models.llama import count_params
from core.models.slicegpt import save_slicegpt
from pruning.slicegpt import SliceGPT


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base, pruned, tok = base_and_pruned()
    save_checkpoint(pruned, tok, root / "Taylor_ckpt", {"method": "taylor",
                                                        "layer_ranges": {"attention": [1, 2], "mlp": [1, 3]}})
    pruned.save_pretrained(root / "HF_dir")  # plain HF dir (config.json + model.safetensors)
    (root / "LLMPruner_bundle").mkdir()
    torch.save({"model": pruned, "tokenizer": Tok()}, root / "LLMPruner_bundle" / "pytorch_model.bin")
    (root / "Whole").mkdir()
    torch.save(pruned, root / "Whole" / "model.pt")
    torch.save(state_dict_copy(pruned), root / "loose_state_dict.pt")  # a file directly in the folder
    sliced = copy.deepcopy(base)  # SliceGPT's own output (hidden 64 -> 48): .pt + slicing .json + config.json
    SliceGPT(sparsity=0.2, progress=False)(sliced, torch.randint(0, 256, (4, 24), generator=torch.Generator()))
    save_slicegpt(sliced, root / "SliceGPT_2000", "Llama", 0.2)
    (root / "Base_eval_only").mkdir()
    (root / "Base_eval_only" / "evaluation_results.json").write_text("{}")
    (root / "Broken").mkdir()
    (root / "Broken" / "config.json").write_text(json.dumps(pruned.config.to_dict()))
    (root / "Broken" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"0" * 64)
    # a model whose analysis/ cannot be created (a file is in the way): output goes to the run dir
    pruned.save_pretrained(root / "Blocked")
    (root / "Blocked" / "analysis").write_text("not a dir")
    return root, base, count_params(sliced)


def test_batch_mixed_folder(folder, tmp_path):
    root, base, sliced_params = folder
    b = structure_of(base, name="tiny")
    run_dir = tmp_path / "run"
    res = batch_analyze(root, b, run_dir, allow_pickle=False, count_nonzero=True, next_to_inputs=True)
    st = {m["name"]: (m["format"], m["status"]) for m in res["models"]}
    assert st == {
        "Taylor_ckpt": ("prunelab", "ok"), "HF_dir": ("hf", "ok"), "Blocked": ("hf", "ok"),
        "LLMPruner_bundle": ("pickle_bundle", "ok"), "Whole": ("whole_model_pt", "ok"),  # read running no code
        "loose_state_dict": ("state_dict_pt", "ok"), "SliceGPT_2000": ("slicegpt", "ok"),
        "Base_eval_only": ("eval_only", "skipped"), "Broken": ("hf", "failed")}
    by = {m["name"]: m for m in res["models"]}
    assert "corrupt safetensors" in by["Broken"]["error"]
    assert by["Taylor_ckpt"]["output_dir"] == str(root / "Taylor_ckpt" / "analysis")
    assert by["Blocked"]["output_dir"] == str(run_dir / "analysis" / "Blocked")
    assert by["loose_state_dict"]["output_dir"] == str(run_dir / "analysis" / "loose_state_dict")
    for name in ("Taylor_ckpt", "HF_dir", "SliceGPT_2000"):
        out = root / name / "analysis"
        assert {p.name for p in out.iterdir()} >= {"model_structure.json", "model_comparison.json",
                                                   "structure_summary.txt", "layers.csv", "sparsity.png"}
    # checkpoint's recorded ranges are not used by batch (no expected ranges): structure exact
    summary = json.loads((run_dir / "models_summary.json").read_text())
    assert set(summary) >= {"timestamp", "models_dir", "models"}
    m = next(x for x in summary["models"] if x["name"] == "Taylor_ckpt")
    assert m["total_params"] == PRUNED_TOTAL and m["num_layers"] == 4
    structural = pytest.approx((BASE_TOTAL - PRUNED_TOTAL) / BASE_TOTAL)
    assert {k: m["pruning"][k] for k in ("original_params", "pruned_params", "reduction_ratio",
                                         "structural_reduction_ratio")} == {
        "original_params": BASE_TOTAL, "pruned_params": PRUNED_TOTAL, "reduction_ratio": structural,
        "structural_reduction_ratio": structural}
    slice_cmp = json.loads((root / "SliceGPT_2000" / "analysis" / "model_comparison.json").read_text())
    assert slice_cmp["layers"][0]["extra"]["attn_shortcut_Q"]["pruned_shape"] == [48, 48]
    m = next(x for x in summary["models"] if x["name"] == "SliceGPT_2000")
    assert m["format"] == "slicegpt" and m["total_params"] == sliced_params  # the shortcut matrices included
    batch = json.loads((run_dir / "batch_analysis_results.json").read_text())
    assert batch["counts"] == {"ok": 7, "failed": 1, "skipped": 1}
    # with the opt-in the same
    res2 = batch_analyze(root, b, tmp_path / "run2", allow_pickle=True, next_to_inputs=True)
    assert {m["name"]: m["status"] for m in res2["models"]}["Whole"] == "ok"
    # earlier analyses are never overwritten: the second batch writes into its own run dir
    out2 = {m["name"]: m.get("output_dir") for m in res2["models"]}
    assert out2["Taylor_ckpt"] == str(tmp_path / "run2" / "analysis" / "Taylor_ckpt")
    assert out2["Whole"] == str(tmp_path / "run2" / "analysis" / "Whole")
    assert res2["counts"] == {"ok": 7, "failed": 1, "skipped": 1}


def test_tasks_through_run(folder, tmp_path):
    root, _, _ = folder
    result, metrics = run_task(["task=analyze", f"model={root / 'Taylor_ckpt'}", "base=tiny", "logger=none"],
                               tmp_path / "a")
    assert metrics["status"] == "completed"
    out = tmp_path / "a" / "analysis"
    assert {p.name for p in out.iterdir()} == {"model_structure.json", "model_comparison.json", "layers.csv",
                                              "structure_summary.txt", "sparsity.png", "module_heatmap.png"}
    a = metrics["analysis"]
    assert a["total_params"] == PRUNED_TOTAL and a["original_params"] == BASE_TOTAL
    assert a["consistency_ok"] and a["verdicts"] == []  # ranges from checkpoint_info.json were checked
    cmp = json.loads((out / "model_comparison.json").read_text())
    assert cmp["consistency"]["ranges"]["mlp"]["ok"] and cmp["size"] is None  # tiny base has no dir
    assert json.loads((out / "model_structure.json").read_text())["size"]["total_bytes"] > 0
    # Every model is analysed, and the run fails (exit 1, one line naming them) because some models failed.
    with pytest.raises(SystemExit):
        run_task(["task=batch_analyze", f"models_dir={root}", "base=tiny", "logger=none"], tmp_path / "b")
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "1 of 9 models failed" in metrics["error"]["message"]
    assert metrics["batch_analyze"]["counts"]["failed"] == 1
    out = Path(metrics["output"]["path"])  # <run dir>/<output_name>/: <models_dir>_analysis by default
    assert out.parent == tmp_path / "b" and (out / "models_summary.json").is_file()
    assert (out / "batch_analysis_results.json").is_file()
    # bad input: not a model -> failed run with a clear message, no traceback for the user
    with pytest.raises(SystemExit):
        run_task(["task=analyze", f"model={root / 'Base_eval_only'}", "base=tiny", "logger=none"], tmp_path / "c")
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["status"] == "failed" and "not a model" in m["error"]["message"]
