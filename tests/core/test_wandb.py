"""The W&B mirror: a sweep's jobs in one group, a flattened config, the standard summary names, per-layer series,
the checkpoint artifact, and a dashboard whose keys are the names the runs emit. Real offline W&B runs, read
back from their ``.wandb`` files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CACHE_DIR, ROOT
from core.run.record import RunContext
from core.run.wandb_view import (EVAL_TABLE, SUMMARY_NAMES, derived_config, eval_table_rows, flatten_config,
                                 layer_range_label, standard_summary, sweep_group)
from recipes import evaluate, prune, replace


def _read_written(wandb_dir: Path, wait_s: float = 30.0) -> dict:
    """The offline run in ``wandb_dir`` once its run record is on disk (W&B's writer process flushes it on its own
    schedule; on a loaded machine that can trail ``finish()``)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        files = list(wandb_dir.glob("offline-run-*/run-*.wandb"))
        try:
            r = read_wandb(files[0]) if files else {"run": None}
        except (AssertionError, Exception):  # noqa: BLE001 - a header or record still being written
            r = {"run": None}
        if r["run"] is not None or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def read_wandb(path: Path) -> dict:
    """An offline run's ``run-<id>.wandb`` (a LevelDB-style log of ``wandb_internal_pb2.Record``s: a 7-byte
    header, 32 KiB blocks, 7-byte chunk headers) -> run fields, config, last summary values, history keys,
    artifacts. W&B 0.31 writes no config.yaml / wandb-summary.json offline and ships no reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out: dict = {"config": {}, "summary": {}, "history": set(), "artifacts": [], "run": None}
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind not in (1, 4):
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        which = rec.WhichOneof("record_type")
        key = lambda u: u.key or "/".join(u.nested_key)  # noqa: E731
        if which == "run":
            out["run"] = {"group": rec.run.run_group, "job_type": rec.run.job_type, "name": rec.run.display_name}
            out["config"].update({key(u): json.loads(u.value_json) for u in rec.run.config.update})
        elif which == "config":
            out["config"].update({key(u): json.loads(u.value_json) for u in rec.config.update})
        elif which == "summary":
            out["summary"].update({key(u): json.loads(u.value_json) for u in rec.summary.update})
        elif which == "history":
            out["history"].update(key(u) for u in rec.history.item)
        elif which == "artifact":
            out["artifacts"].append({"type": rec.artifact.type, "name": rec.artifact.name,
                                     "refs": [e.ref for e in rec.artifact.manifest.contents if e.ref]})
    return out


def _offline_env(tmp: Path) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "WANDB_SILENT": "true",
            "WANDB_CACHE_DIR": str(tmp / "wandb_cache"), "WANDB_DATA_DIR": str(tmp / "wandb_data"),
            "WANDB_CONFIG_DIR": str(tmp / "wandb_config"), "OMP_NUM_THREADS": "1", "PRUNELAB_CACHE": str(CACHE_DIR)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2-job multirun on the tiny model with logger=wandb (offline), models saved and logged as artifacts."""
    tmp = tmp_path_factory.mktemp("wandb_sweep")
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "model=tiny", "pruner=taylor", "layers=all", "eval=quick",
           "eval.generation.enabled=false", "eval.ppl.seq_len=32", "eval.ppl.max_tokens=128", "logger=wandb",
           "save_model=true", "logger.log_model=true", "data.num_samples=2", "data.seq_len=16", "ratio=0.1,0.3",
           f"paths.outputs_root={tmp / 'outputs'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_offline_env(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (tmp / "outputs" / "multirun").glob("*/*")
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file())
    runs = [read_wandb(next((job / "wandb").glob("offline-run-*/run-*.wandb"))) for job in jobs]
    return {"dir": sweep_dir, "root": tmp / "outputs", "jobs": jobs, "runs": runs}


def test_a_sweeps_jobs_share_one_group_and_a_flat_config(sweep):
    runs, sweep_dir = sweep["runs"], sweep["dir"]
    assert len(runs) == 2
    date, time_ = sweep_dir.parent.name, sweep_dir.name
    assert {r["run"]["group"] for r in runs} == {f"sweep-{date}_{time_}"}
    assert {r["run"]["job_type"] for r in runs} == {"prune"}
    assert [r["run"]["name"] for r in runs] == [job.name for job in sweep["jobs"]]
    for r in runs:
        c = r["config"]
        assert c["pruner/name"] == "taylor" and c["method"] == "taylor" and c["layers/attention/start"] == 0
        assert c["layer_range"] == "attn 0-4 / mlp 0-4"  # resolved from the record at the end
        assert not [k for k, v in c.items() if isinstance(v, dict) and v and k != "_wandb"]  # flat
    assert sorted(r["config"]["ratio"] for r in runs) == [0.1, 0.3]


def test_summary_has_the_standard_names_and_matches_the_record(sweep):
    for job, r in zip(sweep["jobs"], sweep["runs"]):
        record = json.loads((job / "metrics.json").read_text())
        s = r["summary"]
        assert s["ppl/pruned"] == pytest.approx(record["eval"]["pruned"]["ppl"]["value"])
        assert s["params/kept_frac"] == pytest.approx(record["params"]["pruned"] / record["params"]["base"])
        for name in ("ppl/base", "ppl/ratio", "params/nonzero_frac", "flops/kept_frac", "time/prune_s"):
            assert name in s, name
        assert s["status"] == "completed" and record["wandb"]["group"] == r["run"]["group"]


def test_per_layer_series_tables_and_the_model_artifact(sweep):
    for job, r in zip(sweep["jobs"], sweep["runs"]):
        assert {"analysis/layer_totals/layer_idx", "analysis/layer_totals/sparsity"} <= r["history"]
        assert "analysis/layers/_type" in r["history"]  # the per-module table
        assert "analysis/layer_totals/sparsity" not in r["summary"]  # a series, not a misleading last value
        (model,) = [a for a in r["artifacts"] if a["type"] == "model"]
        assert model["refs"] and all(ref.startswith(f"file://{job / 'model'}") for ref in model["refs"])


def test_the_dashboard_reads_only_names_the_runs_emit(sweep, capsys):
    from analysis import dashboard

    assert set(dashboard.summary_keys()) <= set(SUMMARY_NAMES)
    measured = set(sweep["runs"][0]["summary"])  # eval=quick: no zero-shot average
    assert set(dashboard.summary_keys()) - {"zeroshot/avg"} <= measured
    assert set(dashboard.history_keys()) <= sweep["runs"][0]["history"]
    assert EVAL_TABLE in dashboard.media_keys()
    pytest.importorskip("wandb_workspaces")  # building the view (a dependency: pyproject.toml)

    group = sweep["runs"][0]["run"]["group"]
    assert dashboard.main(["--entity", "me", "--group", group]) == 0  # no network, no login
    spec = capsys.readouterr().out
    text = json.dumps(json.loads(spec))
    for key in dashboard.summary_keys():
        assert f"summary:{key}" in text, key
    for key in dashboard.history_keys() + ["analysis/layers", EVAL_TABLE, "analysis/sparsity", group]:
        assert key in text, key
    assert '"config:method.value"' in text and '"config:layer_range.value"' in text


def test_a_run_records_its_end_in_wandb_even_for_an_evaluate_run(tmp_path, monkeypatch):
    """In-process: the eval table is built from the record when the recipe logged none; no model: no artifact."""
    for k, v in _offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    ctx = RunContext(tmp_path / "run", task="evaluate", config={"task": "evaluate", "pruner": {"name": "taylor"}},
                     logger="wandb", wandb_group="g", wandb_log_model=True, heartbeat_s=None)
    ctx.log("method", "wanda")
    ctx.log("checkpoint_info", {"layer_ranges": {"attention": [3, 27], "mlp": [3, 27]}})
    ctx.log("eval", {"model": {"ppl": {"value": 12.0}, "task_average": 0.5, "task_average_over": {"piqa": "acc"},
                               "tasks": {"piqa": {"acc": 0.5, "status": "completed"}}}})
    ctx.log("params", {"model": 80, "nonzero": 80})
    ctx.finish("completed")
    r = _read_written(tmp_path / "run" / "wandb")
    assert r["run"]["group"] == "g" and r["run"]["job_type"] == "evaluate"
    assert r["config"]["method"] == "wanda" and r["config"]["layer_range"] == "attn 3-27 / mlp 3-27"
    assert r["summary"]["zeroshot/avg"] == 0.5 and r["summary"]["zeroshot/piqa"] == 0.5
    assert f"{EVAL_TABLE}/_type" in r["history"]  # built from the record
    assert not [a for a in r["artifacts"] if a["type"] == "model"]  # log_model, but no checkpoint saved


# --- pure functions ---------------------------------------------------------------------------------------------

def test_flatten_config_keeps_lists_and_uses_slashes():
    flat = flatten_config({"pruner": {"name": "l1", "opts": {}}, "layers": {"attention": {"start": 3}},
                           "eval": {"tasks": ["piqa"]}, "ratio": 0.2})
    assert flat == {"pruner/name": "l1", "pruner/opts": {}, "layers/attention/start": 3, "eval/tasks": ["piqa"],
                    "ratio": 0.2}


def test_layer_range_and_method_come_from_the_record_when_known():
    cfg = {"task": "prune", "pruner": {"name": "taylor"},
           "layers": {"attention": {"start": 3, "end": -3}, "mlp": {"start": 3, "end": None}}}
    assert derived_config(cfg, view=prune.WANDB_VIEW) == {"method": "taylor", "layer_range": "attn 3--3 / mlp 3-end"}
    assert derived_config(cfg) == {"method": None, "layer_range": None}  # core knows no task: the recipe's view says
    record = {"task": "prune", "method": "taylor", "pruning": {"attention_layers": [3, 27], "mlp_layers": [3, 27]}}
    assert derived_config(cfg, record, prune.WANDB_VIEW)["layer_range"] == "attn 3-27 / mlp 3-27"
    assert derived_config({"task": "evaluate"}, {"task": "evaluate", "status": "completed"},
                          evaluate.WANDB_VIEW)["method"] == "base"
    replaced = {"task": "replace", "compression": {"unit": "replaced_layers", "layers": [1, 5]}}
    assert derived_config({"task": "replace"}, replaced, replace.WANDB_VIEW) == {"method": "replace",
                                                                                "layer_range": "replaced 1,5"}
    assert layer_range_label(None, [0, 4]) == "mlp 0-4" and layer_range_label(None, None) is None


@pytest.mark.parametrize("rel, group", [
    ("multirun/2026-11-24/10-00-00", "sweep-2026-11-24_10-00-00"),
    ("multirun/2026-11-24/10-00-00_1", "sweep-2026-11-24_10-00-00_1"),
    ("baselines/2026-11-24_10-00-00", "baselines-2026-11-24_10-00-00"),
    ("ablations/layers/run3", "ablations-layers_run3"),
])
def test_sweep_group_names(tmp_path, rel, group):
    assert sweep_group(tmp_path / "out" / rel, tmp_path / "out") == group
    assert sweep_group(str(tmp_path / "out" / rel) + "/", str(tmp_path / "out")) == group  # stable spelling


def test_sweep_group_outside_the_outputs_root(tmp_path):
    assert sweep_group(tmp_path / "elsewhere" / "my_sweep", tmp_path / "out") == "sweep-my_sweep"
    assert len(sweep_group(tmp_path / ("x" * 300), tmp_path / "out")) == 128


def test_a_set_group_wins_and_a_single_run_has_none(tmp_path):
    from conftest import compose
    from recipes._launch import wandb_group

    assert wandb_group(compose(["logger.group=mine"], tmp_path)) == "mine"
    assert wandb_group(compose([], tmp_path)) is None


def test_standard_summary_of_a_prune_record():
    record = {
        "task": "prune", "method": "taylor",
        "eval": {"base": {"ppl": {"value": 10.0}, "task_average": 0.6, "efficiency": {"prefill_tokens_per_s": 50.0}},
                 "pruned": {"ppl": {"value": 15.0}, "task_average": 0.5, "mmlu": {"average": 0.3},
                            "task_average_over": {"hellaswag": "acc_norm"},
                            "tasks": {"hellaswag": {"acc": 0.3, "acc_norm": 0.4, "status": "completed"},
                                      "piqa": {"status": "failed"}, "boolq": {"acc": float("nan")}},
                            "efficiency": {"prefill_tokens_per_s": 60.0, "decode_latency_ms": 2.0}}},
        "params": {"base": 100, "pruned": 75, "nonzero_base": 100, "nonzero": 70},
        "flops": {"kept_pct": 80.0}, "timings": {"prune_s": 1.5, "recipe_s": 9.0},
    }
    s = standard_summary(record)
    assert s == pytest.approx({
        "ppl/pruned": 15.0, "ppl/base": 10.0, "ppl/ratio": 1.5, "params/base": 100, "params/pruned": 75,
        "params/kept_frac": 0.75, "params/nonzero_frac": 0.7, "flops/kept_frac": 0.8, "zeroshot/avg": 0.5,
        "zeroshot/base_avg": 0.6, "zeroshot/hellaswag": 0.4, "mmlu/avg": 0.3, "speed/prefill_tok_s": 60.0,
        "speed/decode_ms_per_tok": 2.0, "speed/base_prefill_tok_s": 50.0, "time/prune_s": 1.5, "time/recipe_s": 9.0})
    assert set(s) - {"zeroshot/hellaswag"} <= set(SUMMARY_NAMES)
    record["eval"]["recovered"] = {"ppl": {"value": 12.0}, "task_average": 0.55}
    s = standard_summary(record)
    assert s["ppl/recovered"] == 12.0 and s["zeroshot/recovered_avg"] == 0.55 and s["ppl/pruned"] == 15.0
    assert "mmlu/recovered_avg" not in s and set(s) - {"zeroshot/hellaswag"} <= set(SUMMARY_NAMES)


def test_standard_summary_of_evaluate_and_search_records():
    base_only = {"task": "evaluate", "eval": {"model": {"ppl": {"value": 20.0}}},
                 "params": {"model": 50, "nonzero": 49}}
    assert standard_summary(base_only, evaluate.WANDB_VIEW) == {"ppl/pruned": 20.0, "params/base": 50,
                                                                "params/pruned": 50, "params/kept_frac": 1.0,
                                                                "params/nonzero_frac": 1.0}
    assert standard_summary(base_only) == {"ppl/pruned": 20.0, "params/pruned": 50}  # no view: not its own base
    ckpt = {"task": "evaluate", "method": "l1", "eval": {"model": {"ppl": {"value": None}}},
            "params": {"model": 40, "nonzero": 40}, "checkpoint_info": {"params": {"base": 50, "pruned": 40}}}
    assert standard_summary(ckpt, evaluate.WANDB_VIEW) == {"params/base": 50, "params/pruned": 40,
                                                           "params/kept_frac": 0.8}
    search = {"task": "search", "eval": {"ppl": {"ppl": {"base": 30.0, "k2": 25.0, "k10": 21.0, "donor": 20.0}}},
              "search": {"best": {"2": {"fitness": 0.4}, "10": {"fitness": 0.1}}}}
    assert standard_summary(search) == pytest.approx({
        "ppl/base": 30.0, "ppl/pruned": 21.0, "ppl/ratio": 0.7, "search/best_fitness": 0.1,
        "search/best_fitness_k2": 0.4, "search/best_fitness_k10": 0.1})
    assert standard_summary({}) == {}


def test_eval_table_rows_match_the_evaluate_recipes_columns():
    from analysis.lm_eval_tasks import results_frame

    result = {"tasks": {"piqa": {"acc": 0.6, "n": 10, "status": "completed"}}, "task_average": 0.6,
              "task_average_over": {"piqa": "acc"}, "mmlu": {"average": 0.3, "status": "completed", "n": 5}}
    rows = eval_table_rows({"eval": {"pruned": result, "base": {"ppl": {"value": 3.0}}}})
    assert [(r["model"], r["task"], r["acc"]) for r in rows] == [("pruned", "piqa", 0.6), ("pruned", "mmlu", 0.3),
                                                                 ("pruned", "average", 0.6)]
    assert list(rows[0]) == list(results_frame(result).columns)  # one table layout under one name
