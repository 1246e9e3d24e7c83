"""task=evaluate and task=table through run.py's entry (tiny model), including bad input."""

from __future__ import annotations

import json

import pytest

from conftest import run_task

TINY_PRUNE = ["model=tiny", "pruner=taylor", "logger=none", "eval=none", "layers=all", "ratio=0.5"]


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("prune") / "run"
    run_task(TINY_PRUNE, run_dir)
    assert (run_dir / "model" / "checkpoint_info.json").is_file()
    return run_dir


def test_evaluate_checkpoint_with_base_then_table(pruned_run, tmp_path):
    runs = tmp_path / "runs"
    ev_dir = runs / "eval"
    headline, m = run_task(["task=evaluate", f"model={pruned_run / 'model'}", "logger=none", "eval=zeroshot",
                            "eval.tasks=[piqa,arc_easy]", "eval.limit=2", "eval.ppl.max_tokens=512",
                            "eval.efficiency.enabled=true", "eval.efficiency.prompt_len=8",
                            "eval.efficiency.decode_tokens=2", "eval.efficiency.repeats=1",
                            "optimized_metric.name=avg_acc", "optimized_metric.direction=maximize"], ev_dir)
    assert m["status"] == "completed" and m["method"] == "taylor"
    for side in ("model", "base"):  # the base model (tiny) loads offline: same settings, same run
        ev = m["eval"][side]
        assert set(ev["tasks"]) == {"piqa", "arc_easy"} and ev["lm_eval"]["limit"] == 2
        assert ev["ppl"]["seq_len"] == 128 and ev["ppl"]["source"] == "boolq"
        assert ev["efficiency"]["prompt_len"] == 8
    assert m["eval"]["model"]["efficiency"]["disk_bytes"] > 0  # a saved checkpoint has bytes on disk
    assert m["params"]["model"] < m["params"]["base"] and 0 < m["params"]["kept_pct"] < 100
    assert m["data"]["calibration"]["source"] != m["data"]["evaluation"]["source"]
    assert headline == pytest.approx(m["eval"]["model"]["task_average"])
    assert m["optimized_metric"] == {"name": "avg_acc", "direction": "maximize", "value": headline}
    assert (ev_dir / "eval_results.csv").read_text().count("piqa") == 2  # model and base rows

    (runs / "prune").symlink_to(pruned_run, target_is_directory=True)
    table_dir = tmp_path / "table"
    run_task(["task=table", "logger=none", f"runs=[{runs}]"], table_dir)
    import pandas as pd

    df = pd.read_csv(table_dir / "results.csv")
    assert df.iloc[0]["method"] == "base" and (df["method"] == "base").sum() == 1
    taylor = df[df["method"] == "taylor"]  # the prune run's row and the evaluate run's row
    assert len(taylor) == 2 and taylor["attn_layers"].nunique() == 1 and taylor["params"].nunique() == 1
    assert (table_dir / "results.md").is_file() and (table_dir / "results.tex").is_file()


def _failure(overrides, run_dir, match):
    with pytest.raises(SystemExit):
        run_task(overrides, run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "failed" and match in m["error"]["message"], m["error"]["message"]
    return m


def test_evaluate_bad_input(tmp_path):
    base = ["task=evaluate", "model=tiny", "logger=none", "eval=zeroshot"]
    m = _failure([*base, "eval.tasks=[piqa,no_such_task]"], tmp_path / "a", "no_such_task")
    assert "arc_easy" in m["error"]["message"]  # the available tasks are listed
    _failure([*base, "eval.limit=0"], tmp_path / "b", "eval.limit=0")
    broken = tmp_path / "broken_ckpt"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    m = _failure(["task=evaluate", f"model={broken}", "logger=none", "eval=zeroshot"], tmp_path / "c", str(broken))
    assert "\n" not in m["error"]["message"].strip()  # one clear line, no traceback soup
    # a valid config.json without weights fails inside transformers: still one line naming the model
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    m = _failure(["task=evaluate", f"model={broken}", "logger=none", "eval=zeroshot"], tmp_path / "e", "broken_ckpt")
    assert "\n" not in m["error"]["message"].strip()
    _failure(["task=table", "logger=none", f"runs=[{tmp_path / 'nowhere'}]"], tmp_path / "d", "no such run dir")
