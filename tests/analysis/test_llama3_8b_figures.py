"""Llama-3-8B's real numbers, pinned from a header-only checkpoint of its shape (core/models/shape.py: the published
config.json, no weight bytes), and what the seed's Taylor preset removes on it, from its dry-run plan. The figures
docs/migration.md and conf/experiment/seed_llama3_taylor.yaml quote are the ones computed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.compare import compare
from analysis.structure import TensorInfo, read_safetensors_header, structure_of
from conftest import CACHE_DIR, ROOT, run_task

TOTAL, PER_LAYER, EMBEDDING = 8_030_261_248, 218_112_000, 525_336_576
ATTENTION, MLP, NORMS = 41_943_040, 176_160_768, 8_192
MIGRATION = ROOT / "docs" / "migration.md"
PRESET = ROOT / "conf" / "experiment" / "seed_llama3_taylor.yaml"
# the seeds' own figures (seed 000 / 001: analyze_pruning.py and check_model_size.py outputs)
SEED_PER_LAYER, SEED_REMOVED, SEED_LEFT, SEED_LAYER_RETENTION = 135_266_304, 1_302_331_392, 6_727_929_856, 0.8383
SEED_PRUNED_LAYERS = 27  # layers 3..29 of 32


def _header_dir() -> Path:
    from core.models.ref import ModelRef
    from core.models.shape import shape_path

    ref = ModelRef(name="llama3_8b_shape", kind="shape", shape="llama3_8b", num_layers=None, dtype="bfloat16")
    return shape_path(ref, CACHE_DIR, header_ok=True)


def test_header_only_analysis_of_llama3_8b(tmp_path):
    """task=analyze on model=llama3_8b_shape model.num_layers=null: the full 32 layers from the header alone."""
    _, m = run_task(["task=analyze", "model=llama3_8b_shape", "model.num_layers=null", "count_nonzero=false",
                     "logger=none"], tmp_path)
    assert m["status"] == "completed", m.get("error")
    a = m["analysis"]
    assert (a["total_params"], a["embedding_params"], a["lm_head_params"]) == (TOTAL, EMBEDDING, EMBEDDING)
    assert a["num_layers"] == 32 and a["layer_params"] == 32 * PER_LAYER and not a["tied_embeddings"]
    s = json.loads((tmp_path / "analysis" / "model_structure.json").read_text())
    for layer in s["layers"]:
        assert layer["total"] == PER_LAYER == ATTENTION + MLP + NORMS
        assert (layer["attention"]["total"], layer["mlp"]["total"], layer["norm"]) == (ATTENTION, MLP, NORMS)
        assert (layer["attention"]["num_heads"], layer["attention"]["num_kv_heads"]) == (32, 8)
        assert layer["mlp"]["intermediate_size"] == 14336
    assert s["final_norm_params"] == 4096 and TOTAL == 32 * PER_LAYER + 2 * EMBEDDING + 4096
    assert s["param_bytes"] == 2 * TOTAL  # bfloat16: 14.96 GiB, the seeds' "14.97 GB" with the tokenizer


def _pruned_by_plan(metrics: dict, base_tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The checkpoint the plan describes: the base's header with each layer's widths after (KV groups, MLP)."""
    widths = {w["layer"]: w for w in metrics["plan"]["phases"]["prune"]["widths"]}
    head_dim, q_per_kv = 128, 4
    out = {}
    for name, t in base_tensors.items():
        shape = list(t.shape)
        if ".layers." in name:
            w = widths[int(name.split(".layers.")[1].split(".")[0])]
            kv, inter = w["kv_heads"][1], w["intermediate_size"][1]
            rows = {"q_proj": kv * q_per_kv * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim,
                    "gate_proj": inter, "up_proj": inter}
            cols = {"o_proj": kv * q_per_kv * head_dim, "down_proj": inter}
            module = name.split(".")[-2]
            if module in rows:
                shape[0] = rows[module]
            elif module in cols:
                shape[1] = cols[module]
        out[name] = TensorInfo(tuple(shape), t.dtype)
    return out


def _plan(args: list[str], run_dir: Path) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "experiment=seed_llama3_taylor",
                           "model=llama3_8b_shape", "dry_run=true", "logger=none", *args,
                           f"paths.cache_dir={CACHE_DIR}", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def base8b():
    d = _header_dir()
    tensors = read_safetensors_header(d / "model.safetensors")
    return tensors, structure_of(tensors, config=json.loads((d / "config.json").read_text()), name="llama3_8b")


def _removed(metrics: dict, base8b) -> tuple[dict, object]:
    tensors, base = base8b
    pruned = structure_of(_pruned_by_plan(metrics, tensors), config=base.config, name="planned")
    return compare(base, pruned)["total_params"], pruned


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def test_seed_taylor_preset_says_what_it_removes_on_the_real_model(tmp_path, base8b):
    """python run.py experiment=seed_llama3_taylor model=llama3_8b_shape dry_run=true prints the plan; the preset's
    comment and the migration page say what that plan removes: whole KV groups (q 3072, k/v 768) and MLP 10752."""
    out, m = _plan([], tmp_path / "taylor")
    assert "removes: 54 KV groups in layers [3, 30) (group ratio 0.25), 96,768 MLP channels" in out
    assert "3-29: kv 8->6, MLP 14336->10752" in out
    t, pruned = _removed(m, base8b)
    layer = pruned.layers[3]
    shapes = {k.split(".")[1]: v.shape for k, v in layer.modules.items()}
    assert (shapes["q_proj"], shapes["k_proj"], shapes["v_proj"], shapes["o_proj"]) == (
        [3072, 4096], [768, 4096], [768, 4096], [4096, 3072])
    assert (shapes["gate_proj"], shapes["up_proj"], shapes["down_proj"]) == ([10752, 4096], [10752, 4096], [4096, 10752])
    assert pruned.layers[2].params() == pruned.layers[30].params() == PER_LAYER
    assert t["reduced"] == 1_472_200_704 and _pct(t["reduction_ratio"]) == "18.33%"
    # the seed's -16.22%: the same preset with the ratio given as a share of all parameters
    out2, m2 = _plan(["ratio_target=params", "ratio=0.1622"], tmp_path / "params")
    assert "3-29: kv 8->7, MLP 14336->10837" in out2
    t2, _ = _removed(m2, base8b)
    assert t2["reduced"] == 1_302_441_984 and _pct(t2["reduction_ratio"]) == _pct(SEED_REMOVED / TOTAL) == "16.22%"
    for path in (PRESET, MIGRATION):  # the preset's comment and the docs quote these, arrows and minus either way
        flat = " ".join(path.read_text().replace("#", " ").replace("→", "->").replace("−", "-").split())
        for needle in ("4096 -> 3072", "1024 -> 768", "14336 -> 10752", f"{t['reduced']:,}",
                       f"-{_pct(t['reduction_ratio'])}", "ratio_target=params ratio=0.1622", "14336 -> 10837",
                       f"-{_pct(t2['reduction_ratio'])}", f"{TOTAL:,}"):
            assert needle in flat, (path.name, needle)
    assert f"{t2['reduced']:,}" in MIGRATION.read_text()


def test_the_seeds_inconsistent_figures_are_documented():
    """The seeds' per-layer count and global share against the real model's, as docs/migration.md states them."""
    doc = " ".join(MIGRATION.read_text().split())
    outside_layers = 2 * EMBEDDING + 4096
    seed_total = 32 * SEED_PER_LAYER + outside_layers
    assert seed_total == 5_379_198_976 != TOTAL and SEED_REMOVED + SEED_LEFT == TOTAL
    implied = SEED_PRUNED_LAYERS * PER_LAYER * (1 - SEED_LAYER_RETENTION) / TOTAL  # the tables' retention
    per_pruned_layer = SEED_REMOVED // SEED_PRUNED_LAYERS
    assert per_pruned_layer * SEED_PRUNED_LAYERS == SEED_REMOVED
    for needle in (f"{TOTAL:,}", f"{PER_LAYER:,}", f"{EMBEDDING:,}", f"{ATTENTION:,}", f"{MLP:,}", f"{NORMS:,}",
                   f"{SEED_PER_LAYER:,}", f"{seed_total:,}", f"{SEED_REMOVED:,}", f"{SEED_LEFT:,}",
                   _pct(implied), f"{per_pruned_layer:,}", _pct(per_pruned_layer / PER_LAYER),
                   "python run.py task=analyze model=llama3_8b_shape model.num_layers=null count_nonzero=false",
                   "python run.py experiment=seed_llama3_taylor model=llama3_8b_shape dry_run=true"):
        assert needle in doc, needle
    assert _pct(implied) == "11.86%" and _pct(per_pruned_layer / PER_LAYER) == "22.11%"
