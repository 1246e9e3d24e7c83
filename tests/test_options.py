"""Per-option contract: every option of every config group composes; every pruner runs on the tiny model and
its checkpoint reloads with identical logits; every recipe a sweep can run records its optimised metric."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, compose, run_task

GROUPS = ("model", "data", "pruner", "layers", "eval", "logger", "experiment", "paths", "replacement", "search",
          "recovery", "export")
PRUNERS = sorted(p.stem for p in (ROOT / "conf" / "pruner").glob("*.yaml"))


@pytest.mark.parametrize("group,name", [(g, p.relative_to(ROOT / "conf" / g).with_suffix("").as_posix())
                                        for g in GROUPS for p in sorted((ROOT / "conf" / g).rglob("*.yaml"))])
def test_every_option_composes(group, name, tmp_path):
    cfg = compose([f"{group}={name}"], tmp_path)
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_presets_win_over_the_defaults(tmp_path):
    """An experiment's top-level keys override config.yaml's (it comes after _self_): task, ratio, run_name."""
    cfg = compose(["experiment=baselines/base"], tmp_path)
    assert cfg.task == "evaluate" and cfg.run_name == "base"
    cfg = compose(["experiment=baselines/wanda"], tmp_path)
    assert (cfg.pruner.name, cfg.ratio, cfg.run_name, cfg.layers.name) == ("wanda", 0.2, "Wanda_2000", "all")
    cfg = compose(["experiment=baselines/wanda", "ratio=0.5"], tmp_path)
    assert cfg.run_name == "Wanda_5000"
    assert compose(["experiment=baselines/shortgpt"], tmp_path).run_name == "ShortGPT_remove_7"



@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_runs_and_round_trips(name, tiny, calib, tmp_path):
    from core.checkpoint import save_checkpoint
    from core.models import ModelRef, load_model
    from pruning import Pruner, PruneResult
    from recipes._common import build

    cfg = compose([f"pruner={name}", "model=tiny", "layers=all", "ratio=0.5"], tmp_path)
    pruner = build(cfg.pruner, "pruner")
    assert isinstance(pruner, Pruner) and pruner.name == name
    model, tok = tiny
    pruner.check(len(model.model.layers))
    result = pruner(model, calib if pruner.needs_calibration else None)
    assert isinstance(result, PruneResult)
    # structured methods remove parameters; masks (unit "sparsity") zero them in dense shapes and remove none
    assert result.params_after < result.params_before or (
        result.compression["unit"] == "sparsity" and result.compression["amount"] > 0)
    assert {"unit", "amount"} <= set(result.compression)
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": name})
    loaded, _ = load_model(ModelRef.at(out), cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, model(calib).logits, rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [("+pruner.tayl=3", "pruner.tayl: not an option of pruning.llm_pruner.LLMPruner"),
                                       ("pruner.rounding=up", "pruner.rounding='up' is not one of")])
def test_pruner_typos_fail_before_loading(bad, match, tmp_path):
    with pytest.raises(SystemExit):
        run_task(["model=hf", "model.path=/nonexistent", "pruner=taylor", bad, "logger=none"], tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "failed" and match in m["error"]["message"], m["error"]["message"]


def test_prune_and_evaluate_record_the_optimised_metric(tmp_path):
    fast = ["model=tiny", "pruner=taylor", "layers=all", "logger=none", "ratio=0.5", "eval.ppl.max_tokens=512",
            "eval.generation.enabled=false"]
    value, m = run_task(fast, tmp_path / "prune")
    assert m["optimized_metric"] == {"name": "ppl", "direction": "minimize", "value": value}
    assert value == m["eval"]["pruned"]["ppl"]["value"] and m["compression"]["unit"] == "group_ratio"
    value, m = run_task(["task=evaluate", f"model={tmp_path / 'prune' / 'model'}", "logger=none",
                         "eval.ppl.max_tokens=512", "eval.generation.enabled=false", "optimized_metric.name=ppl"],
                        tmp_path / "eval")
    assert m["optimized_metric"] == {"name": "ppl", "direction": "minimize", "value": value}
    assert value == m["eval"]["model"]["ppl"]["value"] and m["compression"]["unit"] == "group_ratio"


@pytest.mark.parametrize("overrides,match", [
    (["optimized_metric.name=accuracy"], "optimized_metric.name='accuracy': task=prune reports ppl"),
    (["optimized_metric.direction=maximize"], "ppl is to minimize, not maximize"),
])
def test_optimized_metric_is_checked(overrides, match, tmp_path):
    with pytest.raises(SystemExit):
        run_task(["model=tiny", "pruner=taylor", "logger=none", "eval=none", *overrides], tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert match in m["error"]["message"], m["error"]["message"]


def test_the_default_pruner_is_the_compensated_one(tmp_path):
    """`python run.py` prunes with pruner=obs (issue 13: the best method within minutes on SmolLM2): 25% of all
    parameters, 131,072 calibration tokens, refitted towards the dense model; LLM-Pruner stays pruner=taylor."""
    cfg = compose([], tmp_path)
    assert cfg.pruner._target_ == "pruning.obs.StructuredOBS"
    assert (cfg.pruner.ratio, cfg.pruner.ratio_target, cfg.pruner.tokens, cfg.pruner.target) == (0.25, "params", 131072,
                                                                                               "dense")
    assert compose(["pruner=taylor"], tmp_path).pruner._target_ == "pruning.llm_pruner.LLMPruner"
